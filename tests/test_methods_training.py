"""The method presets (experiments/methods/<name>.yaml) end to end: ``describe`` counts what the formulas of methods.md
count, and a 3-step ``fit`` on the smoke experiment leaves a checkpoint, an adapter that loads back exactly and the
per-layer routing entropy in TensorBoard (FlyLoRA's ranks counting as its experts)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moelora_lit import load_adapter
from moelora_lit.adapter_io import adapter_state_dict, read_adapter_config
from moelora_lit.describe import formula_params

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("moelora", "lora", "loramoe", "hydralora", "mola", "flylora", "mixlora")


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)                      # the configs name the embedded base by its repository path


def _configs(preset: str) -> list[str]:
    return ["--config", "experiments/smoke.yaml", "--config", f"experiments/methods/{preset}.yaml"]


@pytest.mark.parametrize("preset", PRESETS)
def test_describe_counts_what_the_formulas_count(preset):
    from moelora_lit.lightning.describe_run import describe_config

    description = describe_config(_configs(preset))
    assert description["method"] == preset
    modules = description["modules"]
    by_formula = sum(formula_params(m) for m in modules) + sum(r["trainable"] for r in description["routers"])
    assert description["trainable_params"] == by_formula > 0
    if preset == "mola":                         # the embedded base has 4 blocks: 2, 4, 6, 8 experts
        assert sorted({m["experts"] for m in modules}) == [2, 4, 6, 8]
    if preset == "flylora":
        assert all(m["experts"] == 32 and m["top_k"] == 8 and m["router"] == "implicit" for m in modules)
        assert description["frozen_adapter_params"] == sum(32 * m["in"] for m in modules)
    if preset == "mixlora":
        assert len(description["blocks"]) == len(description["routers"]) == 4
        assert all(r["trainable"] == 8 * 192 for r in description["routers"])


def _tiny_base() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(REPO / "moelora_lit/assets/tiny-base").eval()


@pytest.mark.parametrize("preset", PRESETS)
def test_fit_three_steps_leaves_checkpoint_adapter_and_routing_entropy(preset, tmp_path):
    from moelora_lit.__main__ import main

    main(["fit", *_configs(preset), "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path}",
          "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false", "--test_after_fit=false",
          "--data.train=[{name: synth_all, limit: 32}]"])
    run = tmp_path / "lightning_logs" / "version_0"
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    adapter_dir = run / "adapter"
    config = read_adapter_config(adapter_dir)
    assert config.method == preset

    model = load_adapter(_tiny_base(), adapter_dir)
    saved = load_file(str(adapter_dir / "adapter.safetensors"))
    restored = adapter_state_dict(model)
    assert restored.keys() == saved.keys()
    trained = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    for key, tensor in saved.items():
        assert torch.equal(restored[key], tensor), key
        assert torch.equal(trained[f"model.{key}"], tensor), key           # the adapter is the step-3 state
    if preset == "flylora":
        assert any(key.endswith("rank_bias") and tensor.abs().sum() > 0 for key, tensor in saved.items())

    events = [f for f in run.iterdir() if f.name.startswith("events.out.tfevents")]
    scalars = {}
    for f in events:
        accumulator = EventAccumulator(str(f), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [e.value for e in accumulator.Scalars(tag)]
    names = json.loads((adapter_dir / "adapter_config.json").read_text())["target_names"]
    for name in names:
        values = scalars.get(f"routing/entropy/{name}")
        assert values and all(math.isfinite(v) for v in values), name
        if preset == "lora":
            assert max(values) == 0.0                                      # one expert
        elif preset == "flylora":                                          # 8 of 32 ranks, equal gates 1/8
            assert values == pytest.approx([math.log(8)] * len(values), rel=1e-5), name
        elif preset == "mixlora" and not name.endswith("mlp"):
            assert max(values) == 0.0                                      # attention: plain LoRA
        else:
            assert max(values) > 0.0, name
