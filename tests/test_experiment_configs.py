"""The experiment configs in ``experiments/``: every YAML parses alone with ``fit --print_config``, and the
reproduction configs resolve (through their ``config:`` includes) to the adapter, data and trainer the
experiments README promises. ``--print_config`` stops before anything is instantiated, so no base model,
tokenizer or data file is needed; the parsing runs in-process (``moelora_lit.__main__.main``) to stay fast.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from moelora_lit.__main__ import MoELoRACLI, main
from moelora_lit.config import MoELoRAConfig
from moelora_lit.data.formats import resolve_name
from moelora_lit.data.specs import as_spec
from moelora_lit.inject import inject_moelora

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SECTIONS = ("model", "data", "trainer", "seed_everything", "config", "faults")


def is_cli_config(path: Path) -> bool:
    """A file the CLI reads with --config (top-level keys are its sections, dotted or not); a study's arm table is
    data for its driver, not a config."""
    keys = yaml.safe_load(path.read_text()) or {}
    return all(str(key).split(".")[0] in SECTIONS for key in keys)


def is_fragment(path: Path) -> bool:
    """A few dotted fields meant to stack after a method preset (a study's parameter match): its stack is what parses
    (tests/test_study_methods.py builds every arm), not the fragment over the defaults."""
    keys = yaml.safe_load(path.read_text()) or {}
    return bool(keys) and "model.adapter" not in keys and all("." in str(key) for key in keys)


ALL_CONFIGS = [p for p in sorted(EXPERIMENTS.rglob("*.yaml")) + sorted(EXPERIMENTS.rglob("*.yml"))
               if is_cli_config(p) and not is_fragment(p)]

MATH_TEST = ["gsm8k", "svamp", "aqua", "mawps", "addsub", "multiarith", "singleeq"]
COMMONSENSE_TEST = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"]
TASKS = {  # task -> (train set, its file stem as `data prepare` writes it, test sets, max_new_tokens, eval batch)
    "math": ("math_10k", "data/math_10k", MATH_TEST, 256, 1),
    "commonsense": ("commonsense_170k", "data/commonsense_170k", COMMONSENSE_TEST, 32, 32),
}
AUTHOR = dict(r=32, num_experts=8, top_k=2, lora_alpha=32.0, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
              router="topk", contrastive_weight=0.01, contrastive_temperature=0.07, contrastive_queue_size=128,
              balance_loss="cv2", balance_weight=0.01, z_loss_weight=0.0, aux_reduction="sum",
              contrastive_max_anchors=None, contrastive_kernel="auto", contrastive_compact_cpu=True,
              method="moelora", expert_layout=None, placement=None, localized_delta=0.1, bias_update_rate=0.001)
VARIANTS = {  # file suffix -> the adapter fields that differ from AUTHOR (r=32, 8 experts, top-2)
    "moelora": {},
    "moelora_r8": {"r": 8},
    "lora": {"num_experts": 1, "top_k": 1, "contrastive_weight": 0.0, "balance_weight": 0.0},
    "moelora_no_contrastive": {"contrastive_weight": 0.0},
    "moelora_random_router": {"router": "random", "balance_weight": 0.0},
    "moelora_experts2": {"num_experts": 2},
    "moelora_experts4": {"num_experts": 4},
    "moelora_experts16": {"num_experts": 16},
    "moelora_top1": {"top_k": 1},
    "moelora_top4": {"top_k": 4},
    "lora_llm_adapters": {"num_experts": 1, "top_k": 1, "lora_alpha": 64.0, "lora_dropout": 0.05,
                          "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                          "contrastive_weight": 0.0, "balance_weight": 0.0},
}
REPRODUCTION = {f"llama7b_{task}_{suffix}": (task, changes) for task in TASKS for suffix, changes in VARIANTS.items()}

_printed: dict[tuple[Path, tuple[str, ...]], dict] = {}
_parser: list = []  # the CLI's parser, captured from the first main() call and reused (building it is most of a call)


def _parse(args: list[str]) -> None:
    """What ``main(args)`` does up to the point where ``--print_config`` exits: the first call runs ``main``
    itself and keeps its parser; later calls hand their arguments to that same parser."""
    if _parser:
        _parser[0].parse_args(args)
        return
    parse_arguments = MoELoRACLI.parse_arguments

    def keep_parser(self, parser, args):  # noqa: ANN001, ANN202
        _parser.append(parser)
        return parse_arguments(self, parser, args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MoELoRACLI, "parse_arguments", keep_parser)
        main(args=args)


def print_config(path: Path, *extra: str) -> dict:
    """``python -m moelora_lit fit --config PATH [extra] --print_config``, parsed back from YAML (cached)."""
    key = (path, extra)
    if key not in _printed:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            _parse(["fit", "--config", str(path), *extra, "--print_config"])
        assert exit_.value.code in (0, None), f"{path.name} does not parse:\n{err.getvalue()[-3000:]}"
        _printed[key] = yaml.safe_load(out.getvalue())
    return _printed[key]


def adapter_of(config: dict) -> MoELoRAConfig:
    """The printed ``model.adapter`` as a validated MoELoRAConfig (print_config itself does not build it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the r=8 variant's s=1 warning is checked separately
        return MoELoRAConfig.from_dict(config["model"]["adapter"] or {})  # null: MoELoRAConfig()


def test_experiment_folder_holds_the_reproduction_configs() -> None:
    names = {p.stem for p in EXPERIMENTS.glob("*.yaml")}
    missing = sorted(set(REPRODUCTION) - names)
    assert not missing, f"missing experiment configs: {missing}"
    assert (EXPERIMENTS / "base" / "llama7b.yaml").is_file()
    readme = (EXPERIMENTS / "README.md").read_text()
    undocumented = sorted(name for name in REPRODUCTION if f"{name}.yaml" not in readme)
    assert not undocumented, f"experiments/README.md does not list {undocumented}"


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_config_parses_alone(path: Path) -> None:
    config = print_config(path)
    assert {"model", "data", "trainer"} <= set(config)
    adapter_of(config)  # r divisible by num_experts, top_k <= num_experts, known router, ...
    for role in ("train", "val", "test"):
        for i, spec in enumerate(config["data"][role] or []):
            resolve_name(as_spec(spec, f"data.{role}[{i}]").name, f"{path.name}: data.{role}[{i}].name")


@pytest.mark.parametrize("name", sorted(REPRODUCTION))
def test_reproduction_config_resolves_as_documented(name: str) -> None:
    task, changes = REPRODUCTION[name]
    config = print_config(EXPERIMENTS / f"{name}.yaml")
    model, data, trainer = config["model"], config["data"], config["trainer"]
    assert model["adapter"] == {**AUTHOR, **changes}
    assert model["base_model"] == "huggyllama/llama-7b"
    train_name, stem, test_names, max_new_tokens, eval_batch = TASKS[task]
    # `data prepare`'s files: LLM-Adapters' split, 120 validation rows held out of the training set.
    assert [(s["name"], s["path"]) for s in data["train"]] == [(train_name, f"{stem}_train.json")]
    assert [(s["name"], s["path"]) for s in data["val"]] == [(train_name, f"{stem}_val.json")]
    assert [s["name"] for s in data["test"]] == test_names
    assert all(s["path"].startswith("data/llm-adapters/") and s["path"].endswith("/test.json") for s in data["test"])
    # LLM-Adapters' evaluation: their answer rules, 4 beams, 256 / 32 new tokens, math one question at a time.
    assert (model["answer_protocol"], model["num_beams"], model["max_new_tokens"]) == ("llm_adapters", 4,
                                                                                        max_new_tokens)
    assert data["eval_batch_size"] == eval_batch and model["generate_on_validation"] is False
    # LLM-Adapters' finetune.py + README command: 3 epochs, lr 3e-4, batch 16, cutoff_len 256, warm-up 100 then
    # linear decay to 0, validation every 200 optimizer steps, the best checkpoint (val loss) tested.
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert model["optimizer"]["init_args"]["lr"] == pytest.approx(3e-4)
    assert model["lr_scheduler"] == {"class_path": "moelora_lit.lightning.schedules.WarmupLinearDecay",
                                     "init_args": {"warmup_steps": 100, "total_steps": None, "last_epoch": -1}}
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in trainer["callbacks"]}
    assert "ScheduleHorizon" in callbacks  # fills in total_steps, so the decay ends at the last step
    assert (callbacks["ModelCheckpoint"]["monitor"], callbacks["ModelCheckpoint"]["mode"]) == ("val/loss", "min")
    assert trainer["val_check_interval"] == 200 * trainer["accumulate_grad_batches"]
    assert data["max_length"] == 256
    assert data["batch_size"] * trainer["accumulate_grad_batches"] * trainer["devices"] == 16
    assert trainer["max_epochs"] == 3 and trainer["precision"] == "bf16-mixed"
    assert data["train_on_inputs"] is name.endswith("_lora_llm_adapters")  # finetune.py's default only there
    assert trainer["default_root_dir"] == f"runs/{name}"  # every run logs to its own folder


def test_command_line_overrides_merge_into_an_included_config() -> None:
    path = EXPERIMENTS / "llama7b_math_moelora_experts16.yaml"
    config = print_config(path, "--model.adapter.top_k", "4", "--model.base_model", "meta-llama/Llama-2-7b-hf",
                          "--trainer.devices", "4", "--trainer.accumulate_grad_batches", "1")
    assert config["model"]["adapter"] == {**AUTHOR, "num_experts": 16, "top_k": 4}
    assert config["model"]["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert config["data"]["test"][0]["name"] == "gsm8k"  # the rest of the include chain is kept
    assert (str(config["trainer"]["devices"]), config["trainer"]["accumulate_grad_batches"]) == ("4", 1)


def test_r8_variant_is_the_degenerate_s1_case() -> None:
    config = print_config(EXPERIMENTS / "llama7b_math_moelora_r8.yaml")
    with pytest.warns(UserWarning, match="per-expert rank 1"):
        adapter = MoELoRAConfig.from_dict(config["model"]["adapter"])
    assert adapter.expert_rank == 1
    assert adapter_of(print_config(EXPERIMENTS / "llama7b_math_moelora.yaml")).expert_rank == 4


def _trainable_per_block(adapter: MoELoRAConfig, hidden: int = 4096) -> tuple[int, int]:
    """(adapter parameters, router parameters) that one LLaMA-7B attention block trains, counted on meta tensors."""
    with torch.device("meta"):
        block = nn.ModuleDict({name: nn.Linear(hidden, hidden, bias=False)
                               for name in ("q_proj", "k_proj", "v_proj", "o_proj")})  # fmt: skip
    inject_moelora(block, adapter)
    trainable = [(name, p.numel()) for name, p in block.named_parameters() if p.requires_grad]
    router = sum(n for name, n in trainable if ".router" in name)
    return sum(n for _, n in trainable) - router, router


def test_lora_baseline_trains_the_same_parameters_as_moelora_up_to_the_router() -> None:
    hidden, targets = 4096, 2  # LLaMA-7B hidden size; q_proj and v_proj
    for task in TASKS:
        moelora = adapter_of(print_config(EXPERIMENTS / f"llama7b_{task}_moelora.yaml"))
        lora = adapter_of(print_config(EXPERIMENTS / f"llama7b_{task}_lora.yaml"))
        (moe_lora, moe_router), (lora_lora, lora_router) = _trainable_per_block(moelora), _trainable_per_block(lora)
        assert moe_lora == lora_lora == targets * 32 * (hidden + hidden)  # A (r x in) + B (out x r), r = 32
        assert moe_router == targets * 8 * hidden and lora_router == 0    # one expert: no router
    # The expert sweep keeps r = 32, so only the router changes with N.
    for n in (2, 4, 16):
        swept = adapter_of(print_config(EXPERIMENTS / f"llama7b_math_moelora_experts{n}.yaml"))
        assert _trainable_per_block(swept) == (moe_lora, targets * n * hidden)


def test_attribution_names_llm_adapters_not_the_moelora_authors() -> None:
    """3 epochs / lr 3e-4 / batch 16 / cutoff 256 are LLM-Adapters' settings, not the MoELoRA authors' scripts."""
    base = (EXPERIMENTS / "base" / "llama7b.yaml").read_text()
    assert "finetune.py defaults: 3 epochs, lr 3e-4" in base and "NOT from the MoELoRA authors" in base
    for path in [*ALL_CONFIGS, EXPERIMENTS / "README.md"]:
        text = " ".join(path.read_text().split())
        assert "follow the MoELoRA author's run scripts" not in text, path
        assert "close to the author's scripts" not in text, path


def test_llm_adapters_lora_baseline_parameter_count() -> None:
    """q,k,v,up,down at r=32 on a LLaMA-7B block: 32 x (3 x (4096+4096) + 2 x (4096+11008)) = 1,753,088."""
    adapter = adapter_of(print_config(EXPERIMENTS / "llama7b_math_lora_llm_adapters.yaml"))
    with torch.device("meta"):
        block = nn.ModuleDict({**{n: nn.Linear(4096, 4096, bias=False) for n in ("q_proj", "k_proj", "v_proj",
                                                                                  "o_proj")},
                               "up_proj": nn.Linear(4096, 11008, bias=False),
                               "gate_proj": nn.Linear(4096, 11008, bias=False),
                               "down_proj": nn.Linear(11008, 4096, bias=False)})
    inject_moelora(block, adapter)
    lora = sum(p.numel() for n, p in block.named_parameters() if p.requires_grad and ".lora_" in n)
    assert lora == 1_753_088 and adapter.lora_alpha / adapter.r == 2.0
