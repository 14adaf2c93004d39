"""The contrastive queue protocol (docs/design.md §1.3): which buffers a queue is, the batched push, and the
all-ranks gather under data parallelism. :class:`moelora_lit.adapters.MoELoRAAdapters` calls these; nothing else
writes a queue.

A layer's queue is three buffers, named here and nowhere else: ``contrastive_queue`` (N, Q, s) ring buffers of
earlier steps' normalised expert representations, ``contrastive_queue_ptr`` (N,) the next write slot and
``contrastive_queue_count`` (N,) the filled slots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from moelora_lit import kernels
from moelora_lit.config import MoELoRAConfig
from moelora_lit.losses import compiled_push_queue, push_queue

QUEUE_BUFFERS: tuple[str, str, str] = ("contrastive_queue", "contrastive_queue_ptr", "contrastive_queue_count")

Entries = tuple[Tensor, Tensor, Tensor]  # (anchors (A, s), experts (A,), weights (A,)) waiting for a queue push


class QueueLayer(Protocol):
    """What the protocol reads of a layer: its settings and its queue buffers (named by :data:`QUEUE_BUFFERS`)."""

    config: MoELoRAConfig
    contrastive_queue: Tensor


def register_queue(layer: nn.Module, num_experts: int, size: int, dim: int, device: torch.device) -> None:
    """Give ``layer`` the empty queue buffers of :data:`QUEUE_BUFFERS`."""
    shapes = ((num_experts, size, dim), (num_experts,), (num_experts,))
    for name, shape, dtype in zip(QUEUE_BUFFERS, shapes, (torch.float32, torch.long, torch.long), strict=True):
        layer.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))


def is_queue_key(key: str) -> bool:
    """Whether a state-dict key (``model.layers.0.self_attn.q_proj.contrastive_queue``) names a queue buffer."""
    return key.rsplit(".", 1)[-1] in QUEUE_BUFFERS


@torch.no_grad()
def push_grouped(layers: Sequence[QueueLayer], entries: Sequence[Entries | None]) -> None:
    """Push ``entries[i]`` into ``layers[i]``'s queue, with one push for all layers of the same shapes and kernel
    setting (the layers are a leading dimension of :func:`moelora_lit.losses.push_queue`): the same values as layer
    by layer, for one kernel call per step instead of one per layer."""
    groups: dict[tuple, list[tuple[QueueLayer, Entries]]] = {}
    for layer, entry in zip(layers, entries, strict=True):
        if entry is None:
            continue
        queue = layer.contrastive_queue
        key = (queue.shape, queue.dtype, queue.device, entry[0].shape, entry[0].dtype, layer.config.contrastive_kernel)
        groups.setdefault(key, []).append((layer, entry))
    for members in groups.values():
        _push_into([layer for layer, _ in members], [entry for _, entry in members])


def _push_into(layers: list[QueueLayer], entries: list[Entries]) -> None:
    """Push into layers whose queues and entries share shapes; in place, so DDP's buffer broadcast and the
    optimizer-free checkpoint both see the new queue."""
    state = [[getattr(layer, name) for layer in layers] for name in QUEUE_BUFFERS]
    if len(layers) == 1:
        args = (*(buffers[0] for buffers in state), *entries[0])
    else:
        parts = zip(*entries, strict=True)                              # anchors, experts, weights
        args = (*(torch.stack(buffers) for buffers in state), *(torch.cat(part) for part in parts))
    pushed = None
    kernel = layers[0].config.contrastive_kernel
    if args[3].shape[0] > 0 and kernels.COMPILED.applies(kernel, compiled_push_queue, args[0]):
        pushed = kernels.COMPILED.run(compiled_push_queue, *args, dynamic=(3, 4, 5))  # ~15 small ops -> one kernel
    pushed = push_queue(*args) if pushed is None else pushed
    for buffers, new in zip(state, pushed, strict=True):
        torch._foreach_copy_(buffers, list(new.unbind(0)) if len(layers) > 1 else [new])


@torch.no_grad()
def gather_entries(layers: Sequence[QueueLayer], entries: Sequence[Entries | None],
                   all_gather: Callable[[Tensor], Tensor]) -> list[Entries]:
    """Every rank's entries for every layer, in rank order (MoCo across devices), with two collectives in all.

    ``all_gather`` maps a local tensor to the stacked ``(world, ...)`` tensors of all ranks. Counts differ between
    ranks, so each rank's rows travel padded to the largest rank's count; the padding is cut off again here.
    """
    device = layers[0].contrastive_queue.device
    dim = max(layer.contrastive_queue.shape[-1] for layer in layers)
    rows, counts = [], []
    for entry in entries:  # one (A, dim + 2) block per layer: anchor, expert, weight
        anchors, experts, weight = entry if entry is not None else (
            torch.zeros(0, dim, device=device), torch.zeros(0, device=device), torch.zeros(0, device=device))
        rows.append(torch.cat([nn.functional.pad(anchors.float(), (0, dim - anchors.shape[1])),
                               experts.float()[:, None], weight.float()[:, None]], 1))
        counts.append(anchors.shape[0])
    local = torch.cat(rows)
    all_counts = all_gather(torch.tensor(counts, device=device, dtype=torch.long)).reshape(-1, len(layers))
    size = int(all_counts.sum(1).max())
    gathered = all_gather(nn.functional.pad(local, (0, 0, 0, size - local.shape[0])))
    gathered = gathered.reshape(-1, size, dim + 2)                                  # (world, size, dim + 2)
    starts = torch.cat([all_counts.new_zeros(all_counts.shape[0], 1), all_counts.cumsum(1)], 1).tolist()
    ends = all_counts.tolist()
    out = []
    for i, layer in enumerate(layers):
        block = torch.cat([gathered[w, start[i]:start[i] + ends[w][i]] for w, start in enumerate(starts)])
        s = layer.contrastive_queue.shape[-1]
        out.append((block[:, :s].to(layer.contrastive_queue.dtype), block[:, dim].long(), block[:, dim + 1]))
    return out
