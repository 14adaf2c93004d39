"""The one owner of a model's adapter state, in the way PEFT's tuner model owns its layers.

:func:`moelora_lit.inject.inject_moelora` creates one :class:`MoELoRAAdapters` per model and keeps it on the model
(``model.moelora_adapters``). It holds the config, the wrapped layers (a list made once), the per-step auxiliary state
(:class:`moelora_lit.aux.AuxGroup`) and the queue protocol (record, compute the terms, push after backward, gather under
data parallelism, save and restore). The public functions (``set_token_mask``, ``collect_aux_losses``,
``push_queues``, ``save_adapter``, ...) are thin calls into it, and no step walks the model's modules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moelora_lit.aux import AuxGroup
from moelora_lit.config import MoELoRAConfig
from moelora_lit.queues import gather_entries, is_queue_key, push_grouped

ATTRIBUTE = "moelora_adapters"
AUX_TERMS = ("contrastive", "balance", "z")


class MoELoRAAdapters:
    """A model's adapter layers and everything they share.

    Attributes:
        config: the :class:`MoELoRAConfig` the model was injected with.
        names: the wrapped modules' names, in module order.
        layers: the adapter layers, in the same order.
        aux: the per-step auxiliary state of every layer.
    """

    def __init__(self, config: MoELoRAConfig, named_layers: list[tuple[str, nn.Module]]) -> None:
        self.config = config
        self.names = [name for name, _ in named_layers]
        self.layers = [layer for _, layer in named_layers]
        self.aux = AuxGroup()
        for layer in self.layers:
            layer.aux_group = self.aux
        self.contrastive_layers = [layer for layer in self.layers if layer.config.contrastive_weight > 0]
        self.fly_layers = [layer for layer in self.layers if getattr(layer, "layout", None) == "fly"]
        self._checked_checkpointing = False

    def attach(self, model: nn.Module) -> None:
        """Keep this owner on ``model`` as a plain attribute (not a submodule: its layers are the model's own)."""
        model.__dict__[ATTRIBUTE] = self

    def named_layers(self) -> list[tuple[str, nn.Module]]:
        return list(zip(self.names, self.layers, strict=True))

    # ----------------------------------------------------------------------------------- per step
    def set_token_mask(self, mask: Tensor | None) -> None:
        """Tell every layer which tokens are real (attention mask of any (batch, seq) shape), or None (all)."""
        for layer in self.layers:
            layer.token_mask = mask

    def set_task_groups(self, groups: Tensor | None) -> None:
        """Each sample's task-group label (batch,) for LoRAMoE's localized balance loss (-1: no group), or None."""
        for layer in self.layers:
            layer.task_groups = groups

    def aux_losses(self, model: nn.Module) -> dict[str, Tensor]:
        """Weighted auxiliary terms of docs/design.md §1.5 from the latest forward, reduced over layers.

        ``{"contrastive": w_cl * sum L_cl, "balance": w_bal * sum L_bal, "z": w_z * sum L_z}`` (``mean`` over the
        layers with ``aux_reduction="mean"``); zeros when off or not training.
        """
        config = self.config
        weights = {"contrastive": config.contrastive_weight, "balance": config.balance_weight,
                   "z": config.z_loss_weight}
        per_layer = [layer.aux_losses for layer in self.layers]
        if (model.training and (any(weights.values()) or self.fly_layers)   # FlyLoRA's bias needs the counts
                and not self._checked_checkpointing
                and any(not terms for terms in per_layer)):
            check_checkpointing(model)  # a training forward left no terms: find out why (one module walk, once)
            self._checked_checkpointing = True
        device = self.layers[0].device
        out = {}
        for key in AUX_TERMS:
            terms = [terms[key] for terms in per_layer if key in terms]
            total = torch.stack(terms).sum() if terms else torch.zeros((), device=device)
            if config.aux_reduction == "mean":
                total = total / max(len(terms), 1)          # over the layers that have the term (routed ones)
            out[key] = weights[key] * total
        return out

    @torch.no_grad()
    def step_end(self, all_gather: Callable[[Tensor], Tensor] | None = None) -> None:
        """What a training step leaves for after its backward: the contrastive queue push, and FlyLoRA's rank-bias
        update from the step's choices (summed over ranks under data parallelism, so every rank's bias agrees)."""
        if self.contrastive_layers:
            self.push_queues(all_gather)
        fly = self.fly_layers
        if not fly:
            return
        taken = [layer.take_bias_counts() for layer in fly]
        if all_gather is None and all(c is None for c in taken):
            return
        counts = torch.stack([torch.zeros_like(layer.rank_bias) if c is None else c.float()
                              for layer, c in zip(fly, taken, strict=True)])                 # (L, r)
        if all_gather is not None:
            counts = all_gather(counts).sum(0)
        for layer, row in zip(fly, counts, strict=True):
            layer.update_rank_bias(row)

    @torch.no_grad()
    def push_queues(self, all_gather: Callable[[Tensor], Tensor] | None = None) -> None:
        """Push every layer's waiting anchors into its contrastive queue (after each backward, docs/design.md §1.3).

        Args:
            all_gather: under data parallelism, maps a local tensor to the stacked ``(world, ...)`` tensors of all
                ranks. All ranks' anchors are then pushed, in rank order, on every rank, so the queues stay
                identical everywhere (MoCo across devices). Every rank must call it at the same time.
        """
        layers = self.contrastive_layers
        if not layers:
            return
        entries = self.aux.take_pending(layers)
        if all_gather is not None:
            entries = gather_entries(layers, entries, all_gather)
        push_grouped(layers, entries)

    # ----------------------------------------------------------------------------------- state
    def state_dict(self, include_queues: bool = False) -> dict[str, Tensor]:
        """Adapter tensors by full key (``model.layers.0.self_attn.q_proj.lora_A.weight``), the live tensors,
        detached; with ``include_queues`` the contrastive queue buffers too (checkpoints, never adapter files)."""
        return {f"{name}.{key}": tensor for name, layer in zip(self.names, self.layers, strict=True)
                for key, tensor in layer.adapter_tensors(include_queues).items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Copy adapter tensors, and queue buffers where ``state`` has them, into the layers; strict about names
        and shapes (every adapter tensor is required, queues are optional)."""
        own = self.state_dict(include_queues=True)
        required = {k for k in own if not is_queue_key(k)}
        missing = sorted(required - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"{source} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]} "
                             "(was it saved from the same base model with the same target_modules?)")
        for key, tensor in state.items():
            if tensor.shape != own[key].shape:
                raise ValueError(f"{source}: tensor {key} has shape {tuple(tensor.shape)} but the model expects "
                                 f"{tuple(own[key].shape)} (check r, num_experts and the base model)")
        for key, tensor in state.items():
            own[key].copy_(tensor.to(own[key].dtype))


def check_checkpointing(model: nn.Module) -> None:
    """Refuse reentrant gradient checkpointing: its first forward runs without autograd, so every auxiliary
    term of docs/design.md §1.5 would silently be 0 with no gradient. Non-reentrant checkpointing is exact."""
    for name, module in model.named_modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        enabled = getattr(module, "gradient_checkpointing", False) and func is not None
        if enabled and getattr(func, "keywords", {}).get("use_reentrant", True):
            raise ValueError(
                f"{name or type(model).__name__} uses reentrant gradient checkpointing (use_reentrant=True), "
                "which drops MoELoRA's contrastive, balance and z losses and FlyLoRA's rank-bias update. Enable it "
                "with gradient_checkpointing_kwargs={'use_reentrant': False} (model.gradient_checkpointing=true "
                "does), or set the auxiliary loss weights to 0."
            )


def adapters_of(model: nn.Module) -> MoELoRAAdapters | None:
    """The owner :func:`moelora_lit.inject.inject_moelora` attached to ``model`` (looked up through wrappers that
    keep the model as ``.module``, e.g. DDP), or None for a model without adapters."""
    seen = 0
    while model is not None and seen < 4:
        owner = model.__dict__.get(ATTRIBUTE)
        if owner is not None:
            return owner
        model = getattr(model, "module", None)
        seen += 1
    return None


def require_adapters(model: nn.Module, caller: str) -> MoELoRAAdapters:
    """:func:`adapters_of`, or a ValueError that says how to get one."""
    owner = adapters_of(model)
    if owner is None:
        raise ValueError(f"{caller}: the model has no MoELoRA layers; call moelora_lit.inject_moelora(model, "
                         "MoELoRAConfig(...)) first")
    return owner
