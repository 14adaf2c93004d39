"""The family's presets on every path MoELoRA takes besides the Lightning fit (tests/test_methods_training.py): the
Hugging Face Trainer, scoring a trained adapter with ``test`` (log-likelihood and generation), an nf4 base, FSDP2 and
the routing probe. The structurally distinct methods stand for the family: MixLoRA (a block instead of linears),
FlyLoRA (frozen A, a bias buffer, implicit routing), MoLA (a different expert count per layer), HydraLoRA (a shared A)
and LoRAMoE (its localized constraint and task_group data)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import tiny_llama
from family import build, layers_of
from safetensors.torch import load_file
from test_hf_trainer import token_rows, train_logs, training_args

from moelora_lit import load_adapter
from moelora_lit.adapter_io import adapter_state_dict
from moelora_lit.data.batching import Collator
from moelora_lit.ffn_block import MixLoRAFFN
from moelora_lit.integrations.transformers import MoELoRATrainer
from moelora_lit.layer import MoELoRALinear

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "experiments" / "smoke.yaml")
TINY = str(REPO / "moelora_lit" / "assets" / "tiny-base")


def _preset(method: str) -> list[str]:
    return ["--config", SMOKE, "--config", str(REPO / "experiments" / "methods" / f"{method}.yaml")]


def _quiet() -> list[str]:
    return ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _run(root: Path) -> Path:
    (run,) = (root / "lightning_logs").glob("version_*")
    return run


# ------------------------------------------------------------------------------------------- Hugging Face Trainer
@pytest.mark.parametrize("method", ["mixlora", "flylora", "mola"])
def test_hf_trainer_trains_logs_routing_per_layer_and_saves_reloadable_adapters(method, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build(method, randomize=False)
    blocks = model.config.num_hidden_layers
    updates: list[int] = []
    update = MoELoRALinear.update_rank_bias
    monkeypatch.setattr(MoELoRALinear, "update_rank_bias",
                        lambda self, counts: (updates.append(id(self)), update(self, counts))[1])
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    trainer = MoELoRATrainer(model=model, args=training_args(tmp_path, save_strategy="steps", save_steps=3),
                             train_dataset=token_rows(), data_collator=Collator(0, eval_mode=False))
    trainer.train()
    logs = train_logs(trainer)
    assert [e["step"] for e in logs] == [1, 2, 3]
    layers = layers_of(model)
    counts = {layer.num_experts for _, layer in layers}
    for e in logs:
        assert math.isfinite(e["train/loss"]) and e["train/loss"] == pytest.approx(e["loss"], rel=1e-5)
        for name, layer in layers:
            entropy, n = e[f"routing/entropy/{name}"], layer.num_experts
            if n == 1:                                            # MixLoRA's attention LoRAs
                assert entropy == 0.0, name
            elif method == "flylora":                             # k of r ranks, equal gates
                assert entropy == pytest.approx(math.log(layer.config.top_k), rel=1e-5), name
            else:                                                 # top-k renormalised over this layer's N
                assert 0 < entropy <= math.log(layer.config.top_k) + 1e-6, name
            # the load spread is over this layer's own experts (MoLA: 2, 4, 6, 8 by depth)
            assert e[f"routing/max_load/{name}"] >= 1 / n - 1e-6 >= e[f"routing/min_load/{name}"] - 2e-6, name
    if method == "mola":
        assert counts == {2, 4, 6, 8}
    if method == "mixlora":
        assert sum(isinstance(layer, MixLoRAFFN) for _, layer in layers) == blocks
    if method == "flylora":                                       # once per step, for every layer
        assert sorted(updates) == sorted([id(layer) for _, layer in layers] * 3)

    trained = adapter_state_dict(model)
    assert any(not torch.equal(before[k], v) for k, v in trained.items())
    folder = tmp_path / "checkpoint-3"
    saved = load_file(folder / "adapter.safetensors")
    assert saved.keys() == trained.keys()
    assert all(".lora_" in k or ".router" in k or k.endswith("rank_bias") for k in saved)
    if method == "flylora":
        assert all(saved[k].abs().sum() > 0 for k in saved if k.endswith("rank_bias"))
    fresh = load_adapter(tiny_llama(num_hidden_layers=blocks), folder)
    for key, value in adapter_state_dict(fresh).items():
        assert torch.equal(value, trained[key]), key


def test_hf_trainer_passes_task_groups_to_loramoe_localized_loss(tmp_path, monkeypatch):
    """The rows' task_group column survives the Trainer's column filter and reaches the localized constraint."""
    torch.manual_seed(0)
    model = build("loramoe", randomize=False)
    seen = []
    compute = MoELoRATrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append(inputs.get("task_group"))
        return compute(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(MoELoRATrainer, "compute_loss", spy)
    rows = [r | {"task_group": i % 2} for i, r in enumerate(token_rows(8))]
    trainer = MoELoRATrainer(model=model, args=training_args(tmp_path, max_steps=2, per_device_train_batch_size=4),
                             train_dataset=rows, data_collator=Collator(0, eval_mode=False))
    trainer.train()
    assert [g.tolist() for g in seen] == [[0, 1, 0, 1]] * 2
    logs = train_logs(trainer)
    assert len(logs) == 2 and all(e["train/balance_loss"] > 0 for e in logs)
    assert all(layer.task_groups is None or layer.task_groups.tolist() == [0, 1, 0, 1] for _, layer in layers_of(model))


# ------------------------------------------------------------------------ a trained adapter scored; the routing probe
PROBE = json.dumps({"class_path": "moelora_lit.lightning.probe.RoutingProbe",
                    "init_args": {"limit": 3, "permutations": 10, "batch_size": 12}})


@pytest.mark.parametrize("method", ["mixlora", "flylora", "mola"])
def test_trained_adapter_scores_by_loglikelihood_and_generation_with_routing_per_dataset(method, tmp_path):
    """A 2-step fit (with the routing probe) exports the adapter; ``test --model.init_adapter`` scores an ARC-style
    set by option log-likelihood and a synthetic set by generation, and writes the per-dataset routing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_loglik import arc_rows

    from moelora_lit.__main__ import main

    main(["fit", *_preset(method), *_quiet(), f"--trainer.default_root_dir={tmp_path / 'fit'}",
          "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--test_after_fit=false",
          "--data.train=[{name: synth_all, limit: 8}]", "--data.batch_size=4", "--data.val=null",
          f"--trainer.callbacks+={PROBE}"])
    fit = _run(tmp_path / "fit")
    adapter = fit / "adapter"
    assert (adapter / "adapter.safetensors").is_file()

    # the routing probe: step 0 and trained, over the routed layers (MixLoRA: its blocks; MoLA: N by depth)
    probe = json.loads((fit / "routing_probe.json").read_text())
    assert probe["step"] == 2 and set(probe["step0"]) >= {"specialisation", "p", "entropy", "use"}
    layers = probe["layers"]
    assert len(probe["trained"]["entropy"]) == len(layers) and len(probe["trained"]["p"]) == len(layers)
    if method == "mixlora":
        assert layers == [f"model.layers.{i}.mlp" for i in range(4)]
    use = {task: torch.tensor(rows) for task, rows in probe["trained"]["use"].items()}       # (layers, widest N)
    for rows in use.values():
        torch.testing.assert_close(rows.sum(-1), torch.ones(len(layers)), atol=1e-3, rtol=0)
    if method == "mola":                                          # 4 blocks: 2, 4, 6, 8 experts, zero-padded to 8
        experts = [2 if ".layers.0." in n else 4 if ".layers.1." in n else 6 if ".layers.2." in n else 8
                   for n in layers]
        for rows in use.values():
            for row, n in zip(rows, experts, strict=True):
                assert row[n:].abs().sum() == 0 and row[:n].sum() > 0.99

    arc = tmp_path / "arc.json"
    arc.write_text(json.dumps(arc_rows(4)))
    main(["test", *_preset(method), *_quiet(), f"--trainer.default_root_dir={tmp_path / 'test'}",
          "--model.init_adapter", str(adapter), "--model.scoring", "loglikelihood", "--model.max_new_tokens", "2",
          "--data.test", f"[{{name: arc_c, path: {arc}}}, {{name: synth_add, limit: 2}}]", "--data.eval_batch_size=4"])
    run = _run(tmp_path / "test")
    results = json.loads((run / "test_results.json").read_text())
    assert results["arc_c"]["scoring"] == "loglikelihood" and results["arc_c"]["n"] == 4
    assert 0 <= results["arc_c"]["acc"] <= 1 and 0 <= results["arc_c"]["acc_norm"] <= 1
    assert results["synth_add"]["scoring"] == "generate" and results["synth_add"]["n"] == 2
    routing = json.loads((run / "routing_test.json").read_text())
    names = json.loads((adapter / "adapter_config.json").read_text())["target_names"]
    assert routing["layers"] == names and set(routing["datasets"]) == {"arc_c", "synth_add"}
    widest = max(len(row) for row in routing["datasets"]["arc_c"])
    for dataset, load in routing["datasets"].items():
        load = torch.tensor(load)                                  # (layers, widest N)
        assert load.shape == (len(names), widest) and routing["tokens"][dataset] > 0
        torch.testing.assert_close(load.sum(-1), torch.ones(len(names)), atol=1e-4, rtol=0)
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    assert {"routing/test_load_heatmap/arc_c", "routing/test_load_heatmap/synth_add"} <= set(events.Tags()["images"])


# ---------------------------------------------------------------------------------------------------- an nf4 base
class FrozenBaseCheck(L.Callback):
    """Records what trains on the quantised base and whether its frozen weights moved."""

    seen: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        model = pl_module.model
        self.block = model.model.layers[0].mlp
        self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        FrozenBaseCheck.seen.update(
            trainable=[n for n, p in model.named_parameters() if p.requires_grad],
            base_types={type(getattr(self.block.mlp, k)).__name__ for k in ("gate_proj", "up_proj", "down_proj")},
            attention=type(model.model.layers[0].self_attn.q_proj.base_layer).__name__)

    def on_train_end(self, trainer, pl_module) -> None:
        now = dict(pl_module.model.named_parameters())
        FrozenBaseCheck.seen["moved"] = [n for n, w in self.weights.items() if not torch.equal(now[n].detach(), w)]


def test_mixlora_on_an_nf4_base_trains_adapters_only_and_loads_onto_the_float_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from moelora_lit.__main__ import main
    from moelora_lit.models.loading import load_base_model

    FrozenBaseCheck.seen.clear()
    main(["fit", *_preset("mixlora"), *_quiet(), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
          "--model.quantization=nf4", "--trainer.limit_val_batches=0", "--test_after_fit=false",
          "--data.train=[{name: synth_all, limit: 8}]", "--data.batch_size=4", "--data.val=null",
          "--trainer.callbacks+=test_family_integrations.FrozenBaseCheck"])
    seen = FrozenBaseCheck.seen
    assert seen["base_types"] == {"Linear4bit"} and seen["attention"] == "Linear4bit"
    assert seen["trainable"] and all(".lora_" in n or ".router" in n for n in seen["trainable"])
    assert any(".mlp.router" in n for n in seen["trainable"]) and seen["moved"] == []
    run = _run(tmp_path)
    saved = load_file(run / "adapter" / "adapter.safetensors")
    assert any(k.endswith("mlp.lora_B.down_proj.weight") and v.abs().sum() > 0 for k, v in saved.items())

    model = load_adapter(load_base_model(TINY), run / "adapter")   # float base
    assert type(model.model.layers[0].mlp).__name__ == "MixLoRAFFN"
    assert type(model.model.layers[0].mlp.mlp.gate_proj).__name__ == "Linear"
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(value, saved[key]), key
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 20, 30, 40]])).logits
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------------- FSDP2
class StepRecord(L.Callback):
    """Per rank: each step's loss, and at the end the whole adapter (gathered under FSDP2) and how it is laid out."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())

    def on_train_end(self, trainer, pl_module) -> None:
        from moelora_lit.lightning.sharding import full_adapter_tensors, is_sharded

        model = pl_module.model
        with full_adapter_tensors(model):
            adapter = {k: v.clone() for k, v in adapter_state_dict(model).items()}
        block = model.model.layers[0].mlp
        torch.save({"adapter": adapter, "losses": torch.stack(self.losses), "sharded": is_sharded(model),
                    "block_sharded": [type(t).__name__ for t in (block.lora_A["gate_proj"].weight,
                                                                 block.lora_B["down_proj"].weight,
                                                                 block.router.weight)]},
                   self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_fsdp2_trains_mixlora_as_ddp_does_and_saves_an_adapter_only_checkpoint(tmp_path):
    from hf_folder import build_tiny_hf_folder
    from test_strategies import MODEL_PARALLEL, _free_port, _launch

    base = build_tiny_hf_folder(tmp_path / "base")

    def fit(name: str, *strategy: str) -> list[str]:
        record = json.dumps({"class_path": "test_family_integrations.StepRecord",
                             "init_args": {"out": str(tmp_path / f"{name}_record")}})
        # torchrun starts both ranks at once (Lightning's own launcher would start the second after the first loads)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(_free_port())]
        return [*torchrun, "-m", "moelora_lit", "fit", *_preset("mixlora"), *_quiet(), "--model.base_model",
                base, f"--trainer.default_root_dir={tmp_path / name}", "--trainer.max_steps=2",
                "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.log_every_n_steps=1",
                "--model.adapter.lora_dropout=0.0", "--data.train=[{name: synth_all, limit: 16}]",
                "--data.batch_size=2", "--data.val=null", "--data.test=null", "--test_after_fit=false",
                "--trainer.limit_val_batches=0",
                f"--trainer.callbacks+={record}", "--trainer.strategy", *strategy]

    _launch([fit("ddp", "ddp"), fit("fsdp", MODEL_PARALLEL)], tmp_path)
    ddp = [torch.load(tmp_path / "ddp_record" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    fsdp = [torch.load(tmp_path / "fsdp_record" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(end["sharded"] and end["block_sharded"] == ["DTensor"] * 3 for end in fsdp)
    assert not any(end["sharded"] for end in ddp)
    for r in (0, 1):                                                      # each rank's batches: the same losses
        assert fsdp[r]["losses"].shape == (2,)
        torch.testing.assert_close(fsdp[r]["losses"], ddp[r]["losses"], rtol=1e-5, atol=1e-6)
    reference = ddp[0]["adapter"]
    assert fsdp[0]["adapter"].keys() == reference.keys()
    assert any(k.endswith("mlp.router.weight") for k in reference)
    for key, value in reference.items():                                  # gradients averaged over the ranks
        assert torch.equal(fsdp[0]["adapter"][key], fsdp[1]["adapter"][key]), key
        torch.testing.assert_close(fsdp[0]["adapter"][key], value, rtol=1e-4, atol=1e-6, msg=key)

    run = _run(tmp_path / "fsdp")
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    keys = [k for k in checkpoint["state_dict"] if ".contrastive_queue" not in k]   # (the attention LoRAs' queues)
    assert keys and all(".lora_" in k or ".router" in k for k in keys)    # adapter only: no base weight
    assert {k[len("model."):] for k in keys} == set(reference)
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(keys)   # AdamW state of the adapters only
    from transformers import AutoModelForCausalLM

    model = load_adapter(AutoModelForCausalLM.from_pretrained(base), run / "adapter")
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(value, fsdp[0]["adapter"][key]), key


@pytest.mark.parametrize("method", ["flylora", "mixlora"])
def test_base_memory_counts_no_adapter_tensor(method):
    """FlyLoRA's rank bias is an adapter buffer and MixLoRA's block keeps the MLP inside: the base's bytes are the
    plain model's."""
    from moelora_lit.models.quantization import base_memory_bytes

    model = build(method, randomize=False)
    assert base_memory_bytes(model) == base_memory_bytes(tiny_llama(num_hidden_layers=model.config.num_hidden_layers))
