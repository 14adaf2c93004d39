"""FLOPs of a benchmark variant: its adapter described as ``python -m moelora_lit describe`` prints it, counted by
:mod:`moelora_lit.flops` (PEFT LoRA's layers are described here in the same format)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from moelora_lit import MoELoRAConfig
from moelora_lit.flops import adapter_flops_per_token, base_flops_per_token


def _peft_entry(name: str, module: nn.Module) -> dict | None:
    ranks = getattr(module, "r", None)
    if not isinstance(ranks, dict) or not ranks or not hasattr(module, "in_features"):
        return None
    adapter = next(iter(ranks))
    return {"name": name, "in": int(module.in_features), "out": int(module.out_features), "experts": 1,
            "rank": int(ranks[adapter]), "top_k": 1, "layout": "slices", "router": "none"}


def describe_model(model: nn.Module) -> dict:
    """``{"modules": [...], "routers": [...], "blocks": [...], "config": {...}}`` of an adapted model: the package's
    :func:`moelora_lit.describe.describe_model` for its own adapters (plus their config, which holds the auxiliary
    settings), PEFT's LoRA layers read here, and nothing for a bare model."""
    config = next((c for m in model.modules() if isinstance(c := getattr(m, "config", None), MoELoRAConfig)), None)
    if config is not None:
        from moelora_lit.describe import describe_model as package_describe

        return {**package_describe(model), "config": dataclasses.asdict(config)}
    modules = [entry for name, module in model.named_modules() if (entry := _peft_entry(name, module)) is not None]
    return {"modules": modules, "routers": [], "blocks": [], "config": {}}


def variant_flops(model: nn.Module, hf_config: Any, seq: int, tokens: int, real_token_fraction: float) -> dict:
    """Per-token and per-step FLOPs of one variant (method's own work and executed), base model included."""
    description = describe_model(model)
    settings = {"real_token_fraction": real_token_fraction}
    own = adapter_flops_per_token(description, settings)
    executed = adapter_flops_per_token(description, settings, executed=True)
    base = base_flops_per_token(hf_config, seq)["total"]
    return {
        "base_flops_per_token": base,
        "adapter_flops_per_token": own["total"],
        "adapter_flops_per_token_executed": executed["total"],
        "adapter_flops_breakdown": {k: own[k] for k in ("router", "experts", "ffn_reruns", "contrastive", "balance",
                                                        "z")},
        "step_flops": tokens * (base + own["total"]),
        "step_flops_executed": tokens * (base + executed["total"]),
        "adapted_modules": len(description["modules"]),
    }
