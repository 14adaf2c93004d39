"""Per-step auxiliary state of a model's MoELoRA layers: one owner, one autograd node and one queue push per step.

At the quickstart's shape (28 wrapped layers of a 4-block model) the per-layer work of the auxiliary terms is small
(thousands of elements), so a step spent more on per-layer overhead (autograd nodes, small ops, kernel calls) than
on the work itself. An :class:`AuxGroup` (``inject_moelora`` gives a model's layers one) therefore owns, per layer,
everything a training step leaves behind (an :class:`AuxSlot`):

- what a training forward records (:meth:`AuxGroup.record`): the inputs of its contrastive, balance and z terms;
- the terms themselves and the anchors waiting for the queue push, computed by :meth:`AuxGroup.flush` for every
  waiting layer at once (all contrastive terms as one autograd node, the balance and z terms stacked);
- the anchors waiting for the queue push, which :class:`moelora_lit.adapters.MoELoRAAdapters` takes
  (:meth:`AuxGroup.take_pending`) and pushes through :mod:`moelora_lit.queues`.

What triggers the flush: the first read of any waiting layer's ``aux_losses`` or ``pending``, that layer's next
forward, or a push. A layer only records into its group and reads through it.

The values equal layer-by-layer computation: bit for bit for the contrastive term and the queues, to float rounding
for the balance and z terms (a reduction over a stacked tensor). Deferring changes no value: the queues do not
change between a forward and the flush, because every push flushes first, and the routing tensors are the
forward's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from moelora_lit.config import MoELoRAConfig
from moelora_lit.losses import (
    cv2_balance_loss,
    expert_contrastive_losses,
    localized_balance_loss,
    switch_balance_loss,
    z_loss,
)
from moelora_lit.queues import Entries


class AuxLayer(Protocol):
    """What the group reads of a layer (:class:`moelora_lit.layer.MoELoRALinear`): its settings and queue."""

    config: MoELoRAConfig
    contrastive_queue: Tensor            # (N, Q, s)
    contrastive_queue_count: Tensor      # (N,)


@dataclass
class AuxSlot:
    """One layer's auxiliary state in its group.

    Attributes:
        recorded: ``(contrastive, routing)`` inputs of the latest training forward, until the flush computes them.
        losses: unweighted terms of the latest training forward (``contrastive``, ``balance``, ``z``).
        pending: the anchors of the latest training forward, until they are pushed into the queue.
    """

    recorded: tuple | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    pending: Entries | None = None


class AuxGroup:
    """The auxiliary state of a set of layers, computed together (see the module docstring)."""

    def __init__(self) -> None:
        self.waiting: list[AuxLayer] = []                   # layers with recorded inputs, in forward order
        self._slots: dict[AuxLayer, AuxSlot] = {}

    def slot(self, layer: AuxLayer) -> AuxSlot:
        """``layer``'s state, flushed first if the layer has recorded inputs."""
        slot = self._slots.setdefault(layer, AuxSlot())
        if slot.recorded is not None:
            self.flush()
        return slot

    def record(self, layer: AuxLayer, contrastive: tuple | None, routing: tuple | None) -> None:
        """Keep ``layer``'s inputs of this forward's terms, replacing its previous terms.

        ``contrastive = (projections, chosen, keep, scored)`` and ``routing = (gates, logits, token weight)`` for
        the balance and z terms; None for a term that is off (both None: the layer has no terms this step).
        """
        slot = self.slot(layer)
        slot.losses = {}
        if contrastive is not None or routing is not None:
            slot.recorded = (contrastive, routing)
            self.waiting.append(layer)

    def take_pending(self, layers: list[AuxLayer]) -> list[Entries | None]:
        """Each layer's anchors waiting for the queue push (flushed first), cleared from its slot."""
        taken = []
        for layer in layers:
            slot = self.slot(layer)
            taken.append(slot.pending)
            slot.pending = None
        return taken

    def flush(self) -> None:
        """Compute every waiting layer's terms into its slot (and its anchors into ``pending``).

        With autograd on whatever the caller's mode: the terms belong to a training forward that recorded them with
        autograd on, and a first read under ``torch.no_grad()`` (a logging hook) must not strip their gradients.
        """
        with torch.enable_grad():
            self._flush()

    def _flush(self) -> None:
        layers, self.waiting = self.waiting, []
        slots = [self._slots[layer] for layer in layers]
        inputs = [slot.recorded for slot in slots]
        for slot in slots:
            slot.recorded = None
        by_kernel: dict[str, list[tuple[AuxSlot, AuxLayer, tuple]]] = {}
        for slot, layer, (contrastive, _) in zip(slots, layers, inputs, strict=True):
            if contrastive is not None:
                by_kernel.setdefault(layer.config.contrastive_kernel, []).append((slot, layer, contrastive))
        for kernel, members in by_kernel.items():
            results = expert_contrastive_losses([
                (a, chosen, keep, layer.contrastive_queue, layer.contrastive_queue_count,
                 layer.config.contrastive_temperature, scored) for _, layer, (a, chosen, keep, scored) in members],
                kernel)
            for (slot, _, (_, chosen, keep, _)), (loss, anchors) in zip(members, results, strict=True):
                slot.losses["contrastive"] = loss
                slot.pending = (anchors, chosen.reshape(-1), keep.reshape(-1))
        same_shape: dict[tuple, list[tuple[AuxSlot, MoELoRAConfig, tuple]]] = {}
        for slot, layer, (_, routing) in zip(slots, layers, inputs, strict=True):
            if routing is not None:
                gates, c = routing[0], layer.config
                key = (gates.shape, gates.dtype, gates.device, c.balance_weight, c.balance_loss, c.z_loss_weight,
                       c.localized_delta)
                same_shape.setdefault(key, []).append((slot, c, routing))
        for members in same_shape.values():
            _routing_terms(members)


def _routing_terms(members: list[tuple[AuxSlot, MoELoRAConfig, tuple]]) -> None:
    """Balance and z terms of layers with the same gate shape and settings, as one stacked computation."""
    c = members[0][1]
    groups = members[0][2][3]                                                            # (B,) or None
    gates, logits, weight = (torch.stack(parts) for parts in
                             zip(*(routing[:3] for *_, routing in members), strict=True))
    terms = {}
    if c.balance_weight > 0:
        if c.balance_loss == "cv2":
            terms["balance"] = cv2_balance_loss(gates, weight)                          # (L,)
        elif c.balance_loss == "localized":
            terms["balance"] = localized_balance_loss(gates, weight, groups, c.localized_delta)
        else:
            terms["balance"] = switch_balance_loss(gates, logits, weight, per_slot=c.balance_loss == "switch")
    if c.z_loss_weight > 0:
        terms["z"] = z_loss(logits, weight)                                              # (L,)
    for key, values in terms.items():
        for (slot, _, _), value in zip(members, values.unbind(0), strict=True):
            slot.losses[key] = value
