"""A model's auxiliary terms computed together: one autograd node and one queue push per step, not one per layer.

At the quickstart's shape (28 wrapped layers of a 4-block model) the per-layer work of the auxiliary terms is small
(thousands of elements), so a step spent more on per-layer overhead (autograd nodes, small ops, kernel calls) than
on the work itself. A training forward therefore only records what each layer's terms need
(:meth:`AuxGroup.record`); the first read of any layer's terms computes every waiting layer's, and the queues of all
layers are pushed in one batched call (:func:`push_pending_together`). The values equal layer-by-layer computation:
bit for bit for the contrastive term and the queues, to float rounding for the balance and z terms (a reduction
over a stacked tensor).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moelora_lit import kernels
from moelora_lit.losses import (
    compiled_push_queue,
    cv2_balance_loss,
    expert_contrastive_losses,
    push_queue,
    switch_balance_loss,
    z_loss,
)

if TYPE_CHECKING:
    from moelora_lit.layer import MoELoRALinear


class AuxGroup:
    """Layers whose auxiliary terms wait to be computed together (``inject_moelora`` gives a model's layers one).

    Deferring changes no value: the queues do not change between a forward and the flush, because every push
    flushes first, and the routing tensors are the forward's own.
    """

    def __init__(self) -> None:
        self.waiting: list[MoELoRALinear] = []

    def record(self, layer: MoELoRALinear, contrastive: tuple | None, routing: tuple | None) -> None:
        """Keep ``layer``'s inputs: ``contrastive = (projections, chosen, keep, scored)`` and
        ``routing = (gates, logits, token weight)`` for the balance and z terms (None: that term is off)."""
        layer._deferred = (contrastive, routing)
        self.waiting.append(layer)

    def flush(self) -> None:
        """Compute every waiting layer's terms into its ``aux_losses`` (and its anchors into ``pending``).

        With autograd on whatever the caller's mode: the terms belong to a training forward that recorded them with
        autograd on, and a first read under ``torch.no_grad()`` (a logging hook) must not strip their gradients.
        """
        with torch.enable_grad():
            self._flush()

    def _flush(self) -> None:
        layers, self.waiting = self.waiting, []
        inputs = [layer._deferred for layer in layers]
        for layer in layers:
            layer._deferred = None
        contrastive = [(layer, item[0]) for layer, item in zip(layers, inputs, strict=True) if item[0] is not None]
        if contrastive:
            results = expert_contrastive_losses([
                (a, chosen, keep, layer.contrastive_queue, layer.contrastive_queue_count,
                 layer.config.contrastive_temperature, scored) for layer, (a, chosen, keep, scored) in contrastive])
            for (layer, (_, chosen, keep, _)), (loss, anchors) in zip(contrastive, results, strict=True):
                layer._aux_losses["contrastive"] = loss
                layer._pending = (anchors, chosen.reshape(-1), keep.reshape(-1))
        same_shape: dict[tuple, list[tuple[MoELoRALinear, tuple]]] = {}
        for layer, (_, routing) in zip(layers, inputs, strict=True):
            if routing is not None:
                gates, c = routing[0], layer.config
                key = (gates.shape, gates.dtype, gates.device, c.balance_weight, c.balance_loss, c.z_loss_weight)
                same_shape.setdefault(key, []).append((layer, routing))
        for members in same_shape.values():
            _routing_terms(members)


def _routing_terms(members: list[tuple[MoELoRALinear, tuple]]) -> None:
    """Balance and z terms of layers with the same gate shape and settings, as one stacked computation."""
    c = members[0][0].config
    gates, logits, weight = (torch.stack(parts) for parts in zip(*(routing for _, routing in members), strict=True))
    terms = {}
    if c.balance_weight > 0:
        terms["balance"] = (cv2_balance_loss(gates, weight) if c.balance_loss == "cv2"
                            else switch_balance_loss(gates, logits, weight))            # (L,)
    if c.z_loss_weight > 0:
        terms["z"] = z_loss(logits, weight)
    for key, values in terms.items():
        for (layer, _), value in zip(members, values.unbind(0), strict=True):
            layer._aux_losses[key] = value


@torch.no_grad()
def push_pending_together(layers: list[MoELoRALinear]) -> None:
    """:meth:`MoELoRALinear.push_pending` of every layer, with one push for all layers of the same shapes.

    The same values as pushing layer by layer (the layers are a leading dimension of :func:`push_queue`), for one
    kernel call per step instead of one per layer.
    """
    groups: dict[tuple, list[MoELoRALinear]] = {}
    for layer in layers:
        if layer.pending is not None:
            queue = layer.contrastive_queue
            key = (queue.shape, queue.dtype, queue.device, layer.pending[0].shape, layer.pending[0].dtype)
            groups.setdefault(key, []).append(layer)
    for group in groups.values():
        entries = [layer.pending for layer in group]
        for layer in group:
            layer.pending = None
        push_into(group, entries)


def push_into(layers: list[MoELoRALinear], entries: list[tuple[Tensor, Tensor, Tensor]]) -> None:
    """Push ``entries[i]`` into ``layers[i]``'s queue (same queue shapes and entry counts), in place."""
    state = [[getattr(layer, f"contrastive_queue{part}") for layer in layers] for part in ("", "_ptr", "_count")]
    if len(layers) == 1:
        args = (*(buffers[0] for buffers in state), *entries[0])
    else:
        parts = zip(*entries, strict=True)                              # anchors, experts, weights
        args = (*(torch.stack(buffers) for buffers in state), *(torch.cat(part) for part in parts))
    pushed = None
    if kernels.use_compiled(args[0]) and args[3].shape[0] > 0:
        pushed = kernels.compiled(compiled_push_queue, dynamic=(3, 4, 5))(*args)   # ~15 small ops -> one kernel
    pushed = push_queue(*args) if pushed is None else pushed
    for buffers, new in zip(state, pushed, strict=True):
        torch._foreach_copy_(buffers, list(new.unbind(0)) if len(layers) > 1 else [new])
