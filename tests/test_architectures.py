"""MoELoRA on tiny random Llama, Mistral, Qwen2, Phi-3, Phi and GPT-2 models built from their config
classes: identity at init, adapter gradients, adapter round trip (docs/design.md §5.5-5.6)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ARCHITECTURES,
    NUM_LAYERS,
    adapter_config,
    randomize_adapter,
    target_modules,
    tiny_model,
    token_batch,
)

from moelora_lit import collect_aux_losses, inject_moelora, load_adapter, moelora_layers, save_adapter, set_token_mask

ARCHS = list(ARCHITECTURES)


def config_for(arch: str, **overrides):
    return adapter_config(target_modules=target_modules(arch), router="topk", balance_weight=0.1, **overrides)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_inject_identity_and_adapter_gradients(arch):
    model = tiny_model(arch)
    batch = token_batch(pad=2)
    base = logits(model, batch)
    config = config_for(arch)
    names = inject_moelora(model, config)
    assert len(names) == NUM_LAYERS * len(config.target_modules)
    assert all(name.rsplit(".", 1)[-1] in config.target_modules for name in names)
    if arch == "gpt2":
        assert all(type(layer.base_layer).__name__ == "Conv1D" for _, layer in moelora_layers(model))
    assert torch.equal(logits(model, batch), base)

    model.train()
    set_token_mask(model, batch["attention_mask"])
    out = model(**batch)
    (out.loss + sum(collect_aux_losses(model).values())).backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
    for name, layer in moelora_layers(model):
        assert layer.lora_B.weight.grad.abs().sum() > 0, name           # task loss (A is random, B zero)
        assert layer.router.weight.grad.abs().sum() > 0, name           # balance loss
        assert layer.lora_A.weight.grad is not None, name


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_round_trip(arch, tmp_path):
    model = tiny_model(arch)
    config = config_for(arch)
    inject_moelora(model, config)
    randomize_adapter(model)
    batch = token_batch(seed=1)
    expected = logits(model, batch)
    assert not torch.equal(expected, logits(tiny_model(arch), batch))
    save_adapter(model, tmp_path)
    fresh = tiny_model(arch)
    torch.manual_seed(99)
    inject_moelora(fresh, config)
    load_adapter(fresh.eval(), tmp_path)
    assert torch.equal(logits(fresh, batch), expected)
