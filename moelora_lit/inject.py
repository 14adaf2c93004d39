"""Target matching, injection and freezing, and the model-level helpers of docs/design.md §2 (token mask,
auxiliary-term collection, queue pushes) as thin calls into the model's :class:`~moelora_lit.adapters.MoELoRAAdapters`.
Adapter files live in :mod:`moelora_lit.adapter_io`."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterator

from torch import Tensor, nn

from moelora_lit.adapters import MoELoRAAdapters, adapters_of, check_checkpointing, require_adapters  # noqa: F401
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
    """(name, layer) for every MoELoRA layer of ``model``, in module order (names relative to ``model``).

    The injected model answers from its owner's list; any other module (a wrapper, a LightningModule) is walked.
    """
    owner = model.__dict__.get("moelora_adapters")
    if owner is not None:
        yield from owner.named_layers()
        return
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
    if adapters_of(model) is not None or any(True for _ in moelora_layers(model)):
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
    wrapped = []
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MoELoRALinear(module, config).train(module.training)
        layer.eval_seed = zlib.crc32(name.encode())  # the random router's eval gates: fixed per layer
        setattr(parent, child, layer)
        wrapped.append((name, layer))
    MoELoRAAdapters(config, wrapped).attach(model)  # the one owner: config, layers, per-step state, queues
    return [name for name, _ in wrapped]


def set_token_mask(model: nn.Module, mask: Tensor | None) -> None:
    """Tell every MoELoRA layer which tokens are real (attention mask, any shape of (batch, seq))."""
    require_adapters(model, "set_token_mask").set_token_mask(mask)


def collect_aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """Weighted auxiliary terms of docs/design.md §1.5 from the latest forward, reduced over layers.

    Returns:
        ``{"contrastive": w_cl * sum L_cl, "balance": w_bal * sum L_bal, "z": w_z * sum L_z}``
        (``mean`` instead of ``sum`` with ``aux_reduction="mean"``); zeros when off or not training.
    """
    return require_adapters(model, "collect_aux_losses").aux_losses(model)


def push_queues(model: nn.Module, all_gather: Callable[[Tensor], Tensor] | None = None) -> None:
    """Push every layer's pending anchors into its contrastive queue (call after each backward).

    Args:
        all_gather: under data parallelism, maps a local tensor to the stacked ``(world, ...)`` tensors of all
            ranks (e.g. ``LightningModule.all_gather``). All ranks' anchors are then pushed, rank by rank, on
            every rank, so the queues stay identical everywhere (MoCo across devices).
    """
    require_adapters(model, "push_queues").push_queues(all_gather)
