"""MoELoRAModule and the CLI end to end: loss of docs/design.md §1.5, TensorBoard tags, adapter-only checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hf_folder import build_tiny_hf_folder
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moelora_lit import MoELoRAConfig, collect_aux_losses, load_adapter, moelora_layers
from moelora_lit.__main__ import main
from moelora_lit.lightning.module import MoELoRAModule

SMOKE = str(Path(__file__).resolve().parents[1] / "experiments" / "smoke.yaml")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_hf_folder(tmp_path_factory.mktemp("tiny-base"))


def run_cli(args: list[str]):
    return main(args=args)


def scalars(log_dir: Path) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for event_file in log_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return values


def test_losses_are_task_plus_weighted_aux(tiny_base: str) -> None:
    adapter = MoELoRAConfig(r=8, num_experts=4, top_k=2, lora_dropout=0.0, contrastive_weight=0.5,
                            balance_weight=0.3, z_loss_weight=0.2, contrastive_queue_size=8)
    module = MoELoRAModule(base_model=tiny_base, adapter=adapter)
    module.configure_model()
    module.train()
    ids = torch.randint(4, 300, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    first = module.compute_losses(batch)
    assert first["contrastive_loss"] == 0  # empty queues on the first step (docs/design.md §1.3)
    second = module.compute_losses(batch)
    aux = collect_aux_losses(module.model)
    assert second["contrastive_loss"] > 0 and second["balance_loss"] > 0 and second["z_loss"] > 0
    for key in ("contrastive", "balance", "z"):
        assert torch.equal(second[f"{key}_loss"], aux[key])
    expected = second["task_loss"] + aux["contrastive"] + aux["balance"] + aux["z"]
    assert torch.allclose(second["loss"], expected)
    # the weights multiply the per-layer sums
    layers = [layer for _, layer in moelora_layers(module.model)]
    assert torch.allclose(aux["z"], 0.2 * sum(layer.aux_losses["z"] for layer in layers))


def test_model_config_builds_an_architecture_without_weights(tiny_base: str) -> None:
    arch = {"model_type": "llama", "vocab_size": 400, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    module = MoELoRAModule(base_model=tiny_base, model_config=arch, adapter=MoELoRAConfig(r=4, num_experts=2))
    module.configure_model()
    assert module.model.config.hidden_size == 32
    assert len(list(moelora_layers(module.model))) == 2


def test_fit_logs_every_tag_and_keeps_adapter_only_checkpoints(tiny_base: str, tmp_path: Path) -> None:
    cli = run_cli(["fit", "--config", SMOKE, "--model.base_model", tiny_base, "--trainer.default_root_dir",
                   str(tmp_path), "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
                   "--trainer.log_every_n_steps", "2", "--model.max_new_tokens", "4"])
    (run,) = [p for p in (tmp_path / "lightning_logs").iterdir() if (p / "checkpoints").is_dir()]
    assert (run / "config.yaml").is_file()
    tags = scalars(run)
    for tag in ("train/loss", "train/task_loss", "train/contrastive_loss", "train/balance_loss", "train/z_loss",
                "val/loss", "val/acc/synth_add", "test/acc/synth_add", "test/acc/synth_units"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        for stat in ("entropy", "load_cv", "max_load"):
            assert f"routing/{stat}/{layer}" in tags
    # every logged total equals its parts (docs/design.md §1.5), step by step
    parts = [tags[f"train/{k}"] for k in ("task_loss", "contrastive_loss", "balance_loss", "z_loss")]
    for total, *terms in zip(tags["train/loss"], *parts, strict=True):
        assert total == pytest.approx(sum(terms), rel=1e-5)
    assert max(tags["train/contrastive_loss"]) > 0

    results = json.loads((run / "test_results.json").read_text())
    assert set(results) == {"synth_add", "synth_units"}
    assert results["synth_add"]["n"] == 16 and 0 <= results["synth_add"]["accuracy"] <= 1
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 32 and {"prompt", "generation", "extracted", "gold", "correct"} <= set(predictions[0])

    ckpt = run / "checkpoints" / "last.ckpt"                          # every fit ends with one
    checkpoint = torch.load(ckpt, weights_only=True)  # plain tensors and types only
    keys = list(checkpoint["state_dict"])
    assert keys and all((".lora_" in k or ".router" in k or ".contrastive_queue" in k) for k in keys)
    assert checkpoint["optimizer_states"]
    base_bytes = os.path.getsize(Path(tiny_base) / "model.safetensors")
    adapter_bytes = sum(v.numel() * v.element_size() for v in checkpoint["state_dict"].values())
    assert adapter_bytes < 0.1 * base_bytes

    # the exported adapter reproduces the trained model's outputs bit for bit
    from transformers import AutoModelForCausalLM

    reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_base).eval(), run / "adapter")
    trained = cli.model.model.eval()
    ids = torch.randint(4, 300, (1, 10))
    with torch.no_grad():
        assert torch.equal(trained(ids).logits, reloaded(ids).logits)


def test_bf16_mixed_runs_on_cpu(tiny_base: str, tmp_path: Path) -> None:
    run_cli(["fit", "--config", SMOKE, "--model.base_model", tiny_base, "--trainer.default_root_dir",
             str(tmp_path), "--trainer.max_steps", "2", "--trainer.precision", "bf16-mixed",
             "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0", "--test_after_fit", "false"])
    (run,) = [p for p in (tmp_path / "lightning_logs").iterdir() if (p / "checkpoints").is_dir()]
    losses = scalars(run)["train/loss"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_ddp_on_two_cpu_processes(tiny_base: str, tmp_path: Path) -> None:
    """The smoke config under ``strategy=ddp, devices=2``: DDP's gradient all-reduce only completes when
    both ranks step; test metrics are summed over ranks; rank 0 alone writes one checkpoint."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "moelora_lit", "fit", "--config", SMOKE, "--model.base_model", tiny_base,
           "--trainer.default_root_dir", str(tmp_path), "--trainer.strategy", "ddp", "--trainer.devices", "2",
           "--trainer.accelerator", "cpu", "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "2",
           "--trainer.limit_val_batches", "0", "--model.max_new_tokens", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stderr + done.stdout
    (run,) = [p for p in (tmp_path / "lightning_logs").iterdir() if (p / "checkpoints").is_dir()]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    results = json.loads((run / "test_results.json").read_text())
    assert results["synth_add"]["n"] == 16 and results["synth_units"]["n"] == 16  # 8 per rank, summed
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 32  # gathered from both ranks
    assert "routing/entropy/model.layers.0.self_attn.q_proj" in scalars(run)
