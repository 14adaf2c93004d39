"""Target matching, injection and freezing, and the model-level helpers: token mask, auxiliary-term collection,
queue pushes (docs/design.md §2). Adapter files live in :mod:`moelora_lit.adapter_io`."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from moelora_lit.aux import AuxGroup, push_pending_together
from moelora_lit.config import MoELoRAConfig
from moelora_lit.layer import MoELoRALinear, base_features


def _is_linear(module: nn.Module) -> bool:
    try:
        base_features(module)
    except TypeError:
        return False
    return True


def matches(name: str, target_modules: list[str] | str) -> bool:
    """A list entry matches the exact module name or a ``.suffix`` of it; a string is a full-match regex."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t.lstrip(".")) for t in target_modules)


def moelora_layers(model: nn.Module) -> Iterator[tuple[str, MoELoRALinear]]:
    """(name, layer) for every MoELoRA layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, MoELoRALinear):
            yield name, module


def inject_moelora(model: nn.Module, config: MoELoRAConfig) -> list[str]:
    """Wrap every targeted linear layer of ``model`` in place and freeze all base parameters.

    Returns:
        The names of the wrapped modules.

    Raises:
        ValueError: nothing matched (the message lists candidate linear layers), a match is not a
            linear layer, or the model already has MoELoRA layers.
    """
    if any(True for _ in moelora_layers(model)):
        raise ValueError("inject_moelora: this model already has MoELoRA layers; inject into a fresh model")
    targets = [(n, m) for n, m in model.named_modules() if n and matches(n, config.target_modules)]
    bad = [f"{n} ({type(m).__name__})" for n, m in targets if not _is_linear(m)]
    if bad:
        raise ValueError(f"MoELoRAConfig.target_modules={config.target_modules!r} matched modules that are "
                         f"not linear layers: {', '.join(bad[:5])}; target linear projections only")
    if not targets:
        linear = [n for n, m in model.named_modules() if n and _is_linear(m)]
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(
            f"MoELoRAConfig.target_modules={config.target_modules!r} matched no module of "
            f"{type(model).__name__}. Linear layers here end in: {', '.join(suffixes)} "
            f"(for example {linear[0] if linear else 'none'}). Set model.adapter.target_modules to some of them."
        )
    for param in model.parameters():
        param.requires_grad_(False)
    group = AuxGroup()  # the layers' auxiliary terms are computed together, once per step
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MoELoRALinear(module, config).train(module.training)
        layer.eval_seed = zlib.crc32(name.encode())  # the random router's eval gates: fixed per layer
        layer.aux_group = group
        setattr(parent, child, layer)
    model.moelora_config = config
    return [name for name, _ in targets]


def set_token_mask(model: nn.Module, mask: Tensor | None) -> None:
    """Tell every MoELoRA layer which tokens are real (attention mask, any shape of (batch, seq))."""
    for _, layer in moelora_layers(model):
        layer.token_mask = mask


def collect_aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """Weighted auxiliary terms of docs/design.md §1.5 from the latest forward, reduced over layers.

    Returns:
        ``{"contrastive": w_cl * sum L_cl, "balance": w_bal * sum L_bal, "z": w_z * sum L_z}``
        (``mean`` instead of ``sum`` with ``aux_reduction="mean"``); zeros when off or not training.
    """
    layers = [layer for _, layer in moelora_layers(model)]
    if not layers:
        raise ValueError("collect_aux_losses: the model has no MoELoRA layers; call inject_moelora first")
    config = layers[0].config
    weighted = config.contrastive_weight or config.balance_weight or config.z_loss_weight
    if model.training and weighted and any(not layer.aux_losses for layer in layers):
        check_checkpointing(model)  # a training forward left no terms: find out why (one module walk, rarely)
    device = layers[0].lora_A.weight.device
    weights = {"contrastive": config.contrastive_weight, "balance": config.balance_weight,
               "z": config.z_loss_weight}
    out = {}
    for key, weight in weights.items():
        terms = [layer.aux_losses[key] for layer in layers if key in layer.aux_losses]
        total = torch.stack(terms).sum() if terms else torch.zeros((), device=device)
        if config.aux_reduction == "mean":
            total = total / len(layers)
        out[key] = weight * total
    return out


def check_checkpointing(model: nn.Module) -> None:
    """Refuse reentrant gradient checkpointing: its first forward runs without autograd, so every auxiliary
    term of docs/design.md §1.5 would silently be 0 with no gradient. Non-reentrant checkpointing is exact."""
    for name, module in model.named_modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        enabled = getattr(module, "gradient_checkpointing", False) and func is not None
        if enabled and getattr(func, "keywords", {}).get("use_reentrant", True):
            raise ValueError(
                f"{name or type(model).__name__} uses reentrant gradient checkpointing (use_reentrant=True), "
                "which drops MoELoRA's contrastive, balance and z losses. Enable it with "
                "gradient_checkpointing_kwargs={'use_reentrant': False} (model.gradient_checkpointing=true "
                "does), or set the auxiliary loss weights to 0."
            )


@torch.no_grad()
def push_queues(model: nn.Module, all_gather: Callable[[Tensor], Tensor] | None = None) -> None:
    """Push every layer's pending anchors into its contrastive queue (call after each backward).

    Args:
        all_gather: under data parallelism, maps a local tensor to the stacked ``(world, ...)`` tensors of all
            ranks (e.g. ``LightningModule.all_gather``). All ranks' anchors are then pushed, rank by rank, on
            every rank, so the queues stay identical everywhere (MoCo across devices). Shapes differ between
            ranks, so the anchors travel padded to the largest rank's count, with zero weight.
    """
    layers = [layer for _, layer in moelora_layers(model)]
    if all_gather is None:
        push_pending_together(layers)
        return
    device = layers[0].lora_A.weight.device if layers else torch.device("cpu")
    dim = max((layer.config.expert_rank for layer in layers), default=1)
    rows, counts = [], []
    for layer in layers:  # one (A, dim + 2) block per layer: anchor, expert, weight
        anchors, experts, weight = layer.pending if layer.pending is not None else (
            torch.zeros(0, dim, device=device), torch.zeros(0, device=device), torch.zeros(0, device=device))
        rows.append(torch.cat([nn.functional.pad(anchors.float(), (0, dim - anchors.shape[1])),
                               experts.float()[:, None], weight.float()[:, None]], 1))
        counts.append(anchors.shape[0])
        layer.pending = None
    local = torch.cat(rows) if rows else torch.zeros(0, dim + 2, device=device)
    all_counts = all_gather(torch.tensor(counts, device=device, dtype=torch.long)).reshape(-1, len(layers))
    size = int(all_counts.sum(1).max()) if len(layers) else 0
    padded = nn.functional.pad(local, (0, 0, 0, size - local.shape[0]))
    gathered = all_gather(padded).reshape(-1, size, dim + 2)                   # (world, size, dim + 2)
    for i, layer in enumerate(layers):
        starts = all_counts[:, :i].sum(1).tolist()
        parts = [gathered[w, start:start + int(all_counts[w, i])] for w, start in enumerate(starts)]
        block = torch.cat(parts)                                                # all ranks, in rank order
        s = layer.config.expert_rank
        layer.push_pending((block[:, :s].to(layer.contrastive_queue.dtype), block[:, dim].long(), block[:, dim + 1]))
