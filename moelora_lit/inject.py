"""Target matching, injection and freezing, and the model-level helpers of docs/design.md §2 (token mask,
auxiliary-term collection, queue pushes) as thin calls into the model's :class:`~moelora_lit.adapters.MoELoRAAdapters`.
Adapter files live in :mod:`moelora_lit.adapter_io`."""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Callable, Iterator

from torch import Tensor, nn

from moelora_lit.adapters import MoELoRAAdapters, adapters_of, check_checkpointing, require_adapters  # noqa: F401
from moelora_lit.config import MoELoRAConfig
from moelora_lit.ffn_block import MixLoRAFFN, is_ffn_block
from moelora_lit.layer import MoELoRALinear, base_features
from moelora_lit.methods import FFN_PROJECTIONS
from moelora_lit.routed import RoutedAdapter


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


def moelora_layers(model: nn.Module) -> Iterator[tuple[str, RoutedAdapter]]:
    """(name, layer) for every MoELoRA layer of ``model``, in module order (names relative to ``model``).

    The injected model answers from its owner's list; any other module (a wrapper, a LightningModule) is walked.
    """
    owner = model.__dict__.get("moelora_adapters")
    if owner is not None:
        yield from owner.named_layers()
        return
    for name, module in model.named_modules():
        if isinstance(module, RoutedAdapter):
            yield name, module


def inject_moelora(model: nn.Module, config: MoELoRAConfig) -> list[str]:
    """Wrap every targeted linear layer of ``model`` in place and freeze all base parameters.

    With ``placement="ffn_block"`` (MixLoRA) every MLP that a target's gate, up or down projection belongs to
    becomes one :class:`~moelora_lit.ffn_block.MixLoRAFFN`, and the other targets get plain LoRA of rank r. A
    per-depth-group ``num_experts`` list gives each layer the count of its block's group.

    Returns:
        The names of the wrapped modules (linears, and MLP blocks for ``ffn_block``), in module order.

    Raises:
        ValueError: nothing matched (the message lists candidate linear layers), a match is not a
            linear layer, a block is not a gated MLP, or the model already has MoELoRA layers.
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
    blocks = _ffn_blocks(model, targets) if config.block_placement == "ffn_block" else {}
    num_blocks = max((i + 1 for i in map(block_index, (n for n, _ in targets)) if i is not None), default=None)
    per_layer = {n: config.experts_at(block_index(n), num_blocks) for n, _ in targets}   # raises on a long list
    lora = dataclasses.replace(config, method="lora", expert_layout="slices", placement="linear", num_experts=1,
                               top_k=1, router="topk", contrastive_weight=0.0, balance_weight=0.0,
                               z_loss_weight=0.0) if blocks else None
    for param in model.parameters():
        param.requires_grad_(False)
    wrapped = []
    for name, module in targets:
        if name.rpartition(".")[0] in blocks:
            continue
        layer_config = lora if blocks else _with_experts(config, per_layer[name])
        layer = MoELoRALinear(module, layer_config).train(module.training)
        layer.eval_seed = zlib.crc32(name.encode())  # the random router's eval gates: fixed per layer
        _replace(model, name, layer)
        wrapped.append((name, layer))
    for name, mlp in blocks.items():
        block = MixLoRAFFN(mlp, config).train(mlp.training)
        _replace(model, name, block)
        wrapped.append((name, block))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    wrapped.sort(key=lambda item: order[item[0]])
    MoELoRAAdapters(config, wrapped).attach(model)  # the one owner: config, layers, per-step state, queues
    return [name for name, _ in wrapped]


def block_index(name: str) -> int | None:
    """The transformer block a module belongs to: the first ``.<number>.`` of its name (``model.layers.3.mlp``)."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def _with_experts(config: MoELoRAConfig, experts: int) -> MoELoRAConfig:
    """The layer's config: the model's, with its block's expert count (the same object when nothing changes)."""
    if config.num_experts == experts:
        return config
    return dataclasses.replace(config, num_experts=experts)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _ffn_blocks(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> dict[str, nn.Module]:
    """The MLPs whose gate, up or down projection is a target (placement ``ffn_block``), refusing other blocks."""
    blocks = {}
    for name, _ in targets:
        parent_name, _, child = name.rpartition(".")
        if child not in FFN_PROJECTIONS:
            continue
        parent = model.get_submodule(parent_name)
        if not is_ffn_block(parent):
            raise ValueError(f"MoELoRAConfig.placement='ffn_block' needs MLPs with gate_proj, up_proj, down_proj and "
                             f"act_fn (Llama, Mistral, Qwen2, SmolLM2); {parent_name} is a {type(parent).__name__}")
        blocks[parent_name] = parent
    if not blocks:
        kinds = sorted({type(model.get_submodule(n.rpartition(".")[0])).__name__ for n, _ in targets if "." in n})
        raise ValueError(f"MoELoRAConfig.placement='ffn_block': target_modules={config_targets(targets)} name no "
                         f"gate_proj, up_proj or down_proj (the targets' blocks here: {', '.join(kinds) or 'none'}); "
                         "MixLoRA's experts are gated MLPs with gate_proj, up_proj, down_proj and act_fn (Llama, "
                         "Mistral, Qwen2, SmolLM2): target those")
    return blocks


def config_targets(targets: list[tuple[str, nn.Module]]) -> str:
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n, _ in targets}))


def set_token_mask(model: nn.Module, mask: Tensor | None) -> None:
    """Tell every MoELoRA layer which tokens are real (attention mask, any shape of (batch, seq)); a model without
    adapters (a plain base scored zero-shot) has nothing to tell."""
    owner = adapters_of(model)
    if owner is not None:
        owner.set_token_mask(mask)


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
