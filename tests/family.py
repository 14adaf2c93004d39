"""Shared builders of the mixture-of-LoRA family tests: each method on a tiny Llama, random adapter weights, the
wrapped layers and their inputs."""

from __future__ import annotations

import torch
from conftest import tiny_llama

from moelora_lit import MoELoRAConfig, inject_moelora
from moelora_lit.adapters import adapters_of
from moelora_lit.ffn_block import MixLoRAFFN

METHODS = ("moelora", "lora", "loramoe", "hydralora", "mola", "flylora", "mixlora")
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]

# Small versions of the presets in experiments/methods/ (no dropout: the forwards are compared exactly).
SETTINGS = {
    "moelora": dict(r=8, num_experts=4, top_k=2, lora_alpha=16.0, target_modules=["q_proj", "v_proj"], router="topk",
                    contrastive_weight=0.1, contrastive_queue_size=16, balance_loss="cv2", balance_weight=0.01),
    "lora": dict(r=8, num_experts=1, top_k=1, lora_alpha=16.0, target_modules=SEVEN, contrastive_weight=0.0,
                 balance_weight=0.0),
    "loramoe": dict(r=4, num_experts=4, top_k=4, lora_alpha=32.0, target_modules=FFN, router="dense",
                    contrastive_weight=0.0, balance_loss="localized", balance_weight=0.1, localized_delta=0.1),
    "hydralora": dict(r=4, num_experts=3, top_k=3, lora_alpha=32.0, target_modules=FFN, router="dense",
                      contrastive_weight=0.0, balance_weight=0.0),
    "mola": dict(r=4, num_experts=[2, 4, 6, 8], top_k=2, lora_alpha=16.0, target_modules=SEVEN, router="topk",
                 contrastive_weight=0.0, balance_loss="switch", balance_weight=0.0),
    "flylora": dict(r=8, num_experts=1, top_k=2, lora_alpha=16.0, target_modules=SEVEN, router="implicit",
                    contrastive_weight=0.0, balance_weight=0.0, bias_update_rate=0.01),
    "mixlora": dict(r=4, num_experts=4, top_k=2, lora_alpha=8.0, target_modules=SEVEN, router="topk",
                    contrastive_weight=0.0, balance_loss="switch_topk", balance_weight=0.01),
}


def method_config(method: str, **overrides) -> MoELoRAConfig:
    return MoELoRAConfig(method=method, **{"lora_dropout": 0.0, **SETTINGS[method], **overrides})


def build(method: str, seed: int = 0, randomize: bool = True, dtype: torch.dtype = torch.float32,
          **overrides) -> torch.nn.Module:
    """A tiny Llama (4 blocks for MoLA's four depth groups, else 2) injected with ``method``; with ``randomize``,
    random non-zero B, routers and FlyLoRA biases (B is zero at init)."""
    config = method_config(method, **overrides)
    model = tiny_llama(num_hidden_layers=4 if isinstance(config.num_experts, list) else 2)
    inject_moelora(model, config)
    model.to(dtype)
    if randomize:
        randomize_family(model, seed)
    return model


@torch.no_grad()
def randomize_family(model: torch.nn.Module, seed: int = 1) -> None:
    """Random B (std 0.1), routers (std 1: well-separated logits, no top-k ties) and FlyLoRA biases; A stays as
    initialised (FlyLoRA's sparse frozen A included)."""
    generator = torch.Generator().manual_seed(seed)

    def fill(tensor: torch.Tensor, std: float) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std)

    for _, layer in adapters_of(model).named_layers():
        bs = layer.lora_B.values() if isinstance(layer, MixLoRAFFN) else [layer.lora_B]
        for b in bs:
            fill(b.weight, 0.1)
        if layer.router is not None:
            fill(layer.router.weight, 1.0)
        if getattr(layer, "layout", None) == "fly":
            fill(layer.rank_bias, 0.05)


def layers_of(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return adapters_of(model).named_layers()


def capture_inputs(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """Record every adapter layer's input of the next forwards (by layer name)."""
    seen, handles = {}, []
    for name, layer in layers_of(model):
        def hook(module, args, name=name):
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1])
        handles.append(layer.register_forward_pre_hook(hook))
    return seen, handles


def fly_layers(model):
    return [(n, layer) for n, layer in layers_of(model) if getattr(layer, "layout", None) == "fly"]
