"""The family's trainable counts against the formulas, adapter files and exact resume, and the configuration errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_model, token_batch
from family import FFN, METHODS, build, fly_layers, layers_of, method_config
from safetensors import safe_open

from moelora_lit import MoELoRAConfig, collect_aux_losses, inject_moelora, load_adapter, save_adapter, set_token_mask
from moelora_lit.adapter_io import adapter_state_dict, load_adapter_state_dict
from moelora_lit.adapters import adapters_of
from moelora_lit.describe import describe_model, formula_params
from moelora_lit.ffn_block import MixLoRAFFN
from moelora_lit.training_step import after_backward


# --------------------------------------------------------------------------------------------- param counts
def formula_by_hand(method: str, entry: dict) -> int:
    """methods.md's per-linear counts, written out per method (independently of describe.formula_params)."""
    i, o, n, r = entry["in"], entry["out"], entry["experts"], entry["rank"]
    if method == "moelora":
        return r * i + o * r + n * i
    if method == "lora" or (method == "mixlora" and entry["layout"] == "slices"):
        return r * (i + o)
    if method in ("loramoe", "mola"):
        return n * r * (i + o) + n * i
    if method == "hydralora":
        return r * i + n * o * r + n * i
    if method == "flylora":
        return o * r
    return n * r * (i + o)                                                 # MixLoRA's FFN linears


@pytest.mark.parametrize("method", METHODS)
def test_trainable_count_equals_the_formula_and_the_real_parameters(method):
    model = build(method, randomize=False)
    description = describe_model(model)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    by_formula = sum(formula_params(m) for m in description["modules"]) + sum(
        r["trainable"] for r in description["routers"])
    assert sum(formula_by_hand(method, m) for m in description["modules"]) + sum(
        r["trainable"] for r in description["routers"]) == by_formula
    assert description["trainable_params"] == by_formula == real
    entries = {m["name"]: m for m in description["modules"]}
    for name, layer in layers_of(model):
        own = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        if isinstance(layer, MixLoRAFFN):
            router = layer.num_experts * layer.hidden
            assert sum(formula_params(entries[f"{name}.{p}"]) for p in FFN) + router == own, name
            assert [r["trainable"] for r in description["routers"] if r["name"] == f"{name}.router"] == [router]
        else:
            assert formula_params(entries[name]) == own, name
    if method == "flylora":                                                # the frozen A is reported as such
        assert description["frozen_adapter_params"] == sum(
            layer.lora_A.weight.numel() for _, layer in layers_of(model))
    if method == "mixlora":
        assert len(description["routers"]) == len(description["blocks"]) == 2


# ----------------------------------------------------------------------------------------- files and resume
@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_adapter_round_trip(method, tmp_path):
    model = build(method).eval()
    batch = token_batch(pad=2)
    with torch.no_grad():
        expected = model(**batch).logits
    save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(1234)                          # a fresh model's own random A (FlyLoRA's frozen one) differs
    fresh = tiny_llama(num_hidden_layers=model.config.num_hidden_layers)
    torch.manual_seed(4321)
    load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, expected)
    if method == "flylora":
        with safe_open(str(tmp_path / "adapter" / "adapter.safetensors"), "pt") as f:
            keys = set(f.keys())
        for name, layer in fly_layers(model):
            assert {f"{name}.lora_A.weight", f"{name}.rank_bias", f"{name}.lora_B.weight"} <= keys
            assert layer.rank_bias.abs().sum() > 0


def _train_steps(model, optimizer, seeds):
    for seed in seeds:
        batch = token_batch(batch=2, seq=8, seed=seed, pad=2)
        set_token_mask(model, batch["attention_mask"])
        adapters_of(model).set_task_groups(torch.tensor([1, 0]))
        torch.manual_seed(seed)
        loss = model(**batch).loss + sum(collect_aux_losses(model).values())
        loss.backward()
        after_backward(model)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("method", METHODS)
def test_exact_resume_from_the_adapter_state_with_queues(method):
    overrides = {"lora_dropout": 0.1} if method != "flylora" else {}
    model = build(method, **overrides).train()
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _train_steps(model, sgd, [0, 1])
    state = {k: v.clone() for k, v in adapter_state_dict(model, include_queues=True).items()}
    if method == "moelora":
        assert any(k.endswith("contrastive_queue_count") and v.sum() > 0 for k, v in state.items())
    fresh = build(method, seed=99, **overrides).train()
    load_adapter_state_dict(fresh, state)
    sgd_fresh = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.1)
    _train_steps(model, sgd, [2, 3])
    _train_steps(fresh, sgd_fresh, [2, 3])
    a, b = adapter_state_dict(model, include_queues=True), adapter_state_dict(fresh, include_queues=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], state[k]) for k in a)               # the two steps changed something


# ---------------------------------------------------------------------------------------------- config errors
def _one_line_naming(err: pytest.ExceptionInfo, field: str) -> None:
    message = str(err.value)
    assert "\n" not in message and f"MoELoRAConfig.{field}=" in message, message


def test_unknown_method_names_the_field():
    with pytest.raises(ValueError) as err:
        MoELoRAConfig(method="nope")
    _one_line_naming(err, "method")
    assert "flylora" in str(err.value)


def test_a_router_the_layout_cannot_use_names_the_field():
    with pytest.raises(ValueError) as err:
        MoELoRAConfig(method="flylora", router="topk", contrastive_weight=0.0, r=8, top_k=2)
    _one_line_naming(err, "router")
    assert "implicit" in str(err.value)


def test_a_per_block_list_longer_than_the_model_names_the_field():
    model = tiny_llama(num_hidden_layers=4)
    config = method_config("mola", num_experts=[2, 4, 6, 8, 10])
    with pytest.raises(ValueError) as err:
        inject_moelora(model, config)
    _one_line_naming(err, "num_experts")
    assert "4 blocks" in str(err.value)
    assert not any(p.requires_grad is False for p in model.parameters())   # nothing was touched


def test_ffn_block_placement_on_gpt2_names_the_block_type():
    model = tiny_model("gpt2")
    config = method_config("mixlora", target_modules=["c_attn", "c_fc", "c_proj"])
    with pytest.raises(ValueError) as err:
        inject_moelora(model, config)
    message = str(err.value)
    assert "\n" not in message and "placement" in message and "GPT2MLP" in message, message
