"""FLOPs of a benchmark variant: its adapter described as ``python -m moelora_lit describe`` prints it, counted by
:mod:`moelora_lit.flops`.

``describe_model`` uses the package's own describer when it has one (``moelora_lit.describe.describe_model``) and
otherwise reads the wrapped layers itself: PEFT's ``LoraLayer``s and the package's adapter layers (any module with a
``base_layer`` and an adapter ``config``; a layer's own ``describe()`` entry wins).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from moelora_lit.flops import adapter_flops_per_token, base_flops_per_token

# The expert layout a method uses when its config names none (agreed configuration of the family).
METHOD_LAYOUT = {"moelora": "slices", "lora": "slices", "loramoe": "independent", "mola": "independent",
                 "mixlora": "independent", "hydralora": "shared_a", "flylora": "fly"}


def _peft_entry(name: str, module: nn.Module) -> dict | None:
    ranks = getattr(module, "r", None)
    if not isinstance(ranks, dict) or not ranks or not hasattr(module, "in_features"):
        return None
    adapter = next(iter(ranks))
    return {"name": name, "in": int(module.in_features), "out": int(module.out_features), "experts": 1,
            "rank": int(ranks[adapter]), "top_k": 1, "layout": "slices", "router": "none"}


def _family_entry(name: str, module: nn.Module) -> dict | None:
    config = getattr(module, "config", None)
    if getattr(module, "base_layer", None) is None or not hasattr(config, "r"):
        return None
    if callable(getattr(module, "describe", None)):
        return {"name": name, **module.describe()}
    method = getattr(config, "method", "moelora")
    layout = getattr(module, "expert_layout", None) or getattr(config, "expert_layout", None) or METHOD_LAYOUT[method]
    experts = getattr(module, "num_experts", None) or config.num_experts
    return {"name": name, "in": int(module.in_features), "out": int(module.out_features), "experts": int(experts),
            "rank": int(config.r), "top_k": int(config.top_k), "layout": layout,
            "router": "implicit" if layout == "fly" else config.router}


def describe_model(model: nn.Module) -> dict:
    """``{"modules": [...], "routers": [...], "blocks": [...], "config": {...}}`` of an adapted model."""
    try:
        from moelora_lit.describe import describe_model as package_describe  # type: ignore[import-not-found]
    except ImportError:
        package_describe = None
    if package_describe is not None:
        return package_describe(model)
    modules, config = [], None
    for name, module in model.named_modules():
        entry = _family_entry(name, module) or _peft_entry(name, module)
        if entry is not None:
            modules.append(entry)
            config = config or getattr(module, "config", None)  # the adapter config the layers share
    config_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
    return {"modules": modules, "routers": [], "blocks": [], "config": config_dict}


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
