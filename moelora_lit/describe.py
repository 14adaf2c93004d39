"""What an injected model holds, as ``python -m moelora_lit describe --config X.yaml`` prints it
(:mod:`moelora_lit.lightning.describe_run` builds the base on the meta device, injects, and calls this).

The JSON: ``method``, ``trainable_params``, ``frozen_adapter_params``, ``modules`` (one per wrapped linear: ``name``,
``in``, ``out``, ``experts``, ``rank`` (the method's own r), ``top_k``, ``layout``, ``router``, ``trainable``),
``routers`` (block-level routers: ``name``, ``trainable``, ``experts``, ``top_k``, ``hidden``) and ``blocks`` (MixLoRA
FFN blocks). On a terminal a short table follows on stderr. :func:`formula_params` is the parameter count of
``methods.md`` for one module entry, which the tests hold the built layers to.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moelora_lit.adapters import require_adapters
from moelora_lit.ffn_block import MixLoRAFFN


def _count(params) -> int:
    return sum(p.numel() for p in params)


def describe_model(model: nn.Module) -> dict[str, Any]:
    """The JSON description of an injected model (see the module docstring)."""
    owner = require_adapters(model, "describe")
    config = owner.config
    modules, routers, blocks = [], [], []
    frozen = 0
    for name, layer in owner.named_layers():
        frozen += _count(p for p in layer.parameters() if not p.requires_grad and _is_adapter_param(layer, p))
        if isinstance(layer, MixLoRAFFN):
            blocks.append({"name": name, "hidden": layer.hidden, "intermediate": layer.intermediate,
                           "experts": layer.num_experts, "top_k": config.top_k, "rank": config.r})
            routers.append({"name": f"{name}.router", "trainable": _count(layer.router.parameters()),
                            "experts": layer.num_experts, "top_k": config.top_k, "hidden": layer.hidden})
            for proj, a in layer.lora_A.items():
                b = layer.lora_B[proj]
                modules.append({"name": f"{name}.{proj}", "in": a.in_features, "out": b.out_features,
                                "experts": layer.num_experts, "rank": config.r, "top_k": config.top_k,
                                "layout": "ffn_expert", "router": "block",
                                "trainable": a.weight.numel() + b.weight.numel()})
            continue
        c = layer.config
        modules.append({"name": name, "in": layer.in_features, "out": layer.out_features,
                        "experts": layer.num_experts, "rank": c.r, "top_k": min(c.top_k, layer.num_experts)
                        if layer.layout != "fly" else c.top_k, "layout": layer.layout, "router": layer.router_name,
                        "trainable": layer.trainable_count()})
    trainable = sum(m["trainable"] for m in modules) + sum(r["trainable"] for r in routers)
    return {"method": config.method, "trainable_params": trainable, "frozen_adapter_params": frozen,
            "modules": modules, "routers": routers, "blocks": blocks}


def _is_adapter_param(layer: nn.Module, param) -> bool:
    """Whether ``param`` belongs to the adapter (FlyLoRA's frozen A), not to the wrapped base."""
    base = getattr(layer, "base_layer", None) or getattr(layer, "mlp", None)
    return base is None or all(param is not p for p in base.parameters())


def formula_params(entry: dict[str, Any]) -> int:
    """Trainable parameters of one ``modules`` entry by the formulas of ``methods.md`` (in -> out, the method's r):
    MoELoRA ``r*in + out*r + N*in``; LoRAMoE and MoLA ``N*r*(in + out) + N*in``; HydraLoRA ``r*in + N*out*r + N*in``;
    FlyLoRA ``out*r``; MixLoRA's FFN linears ``N*r*(in + out)`` (its block router counted in ``routers``); a single
    expert (LoRA) ``r*(in + out)``."""
    i, o, n, r = entry["in"], entry["out"], entry["experts"], entry["rank"]
    router = 0 if entry["router"] in ("none", "random", "implicit", "block") else n * i
    noisy = n * i if entry["router"] == "noisy" else 0
    layout = entry["layout"]
    if layout == "fly":
        return o * r
    if layout == "ffn_expert":
        return n * r * (i + o)
    if layout == "shared_a":
        return r * i + n * o * r + router + noisy
    if layout == "independent":
        return n * r * (i + o) + router + noisy
    return r * i + o * r + router + noisy                                       # slices (MoELoRA, LoRA)


def table(description: dict[str, Any]) -> str:
    """A short human-readable summary: one line per distinct module shape."""
    lines = [f"method {description['method']}: {description['trainable_params']:,} trainable, "
             f"{description['frozen_adapter_params']:,} frozen adapter parameters"]
    seen: dict[tuple, list[str]] = {}
    for m in description["modules"]:
        key = (m["in"], m["out"], m["experts"], m["rank"], m["top_k"], m["layout"], m["router"], m["trainable"])
        seen.setdefault(key, []).append(m["name"].rsplit(".", 1)[-1])
    lines.append(f"{'count':>5} {'in':>6} {'out':>6} {'N':>3} {'r':>4} {'k':>3} {'layout':<12} {'router':<9} "
                 f"{'trainable':>10}  names")
    for (i, o, n, r, k, layout, router, count), names in seen.items():
        lines.append(f"{len(names):>5} {i:>6} {o:>6} {n:>3} {r:>4} {k:>3} {layout:<12} {router:<9} {count:>10,}  "
                     f"{','.join(sorted(set(names)))}")
    for b in description["routers"][:1]:
        lines.append(f"{len(description['routers']):>5} block routers of {b['trainable']:,} parameters")
    return "\n".join(lines)
