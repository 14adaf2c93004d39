"""The adapters' input dropout: ``nn.Dropout``'s semantics with a cheaper mask on CPU.

On CPU, ``torch.nn.functional.dropout`` draws one float32 Bernoulli sample per element from the Mersenne twister
and keeps a float32 mask for backward; with dropout on every adapted projection (LoRAMoE, MoLA, MixLoRA: all seven,
and MixLoRA's down projection once per selected expert) the draws cost more than the adapters' matmuls. Here one
draw (:func:`draw_drop`) takes one of two forms:

- ``p < SPARSE_BELOW`` (the usual 0.05 or 0.1): the dropped positions themselves. The gaps between successive
  dropped elements of an i.i.d. Bernoulli(p) sequence are geometric, ``floor(log(1 - u) / log(1 - p)) + 1`` for
  ``u`` uniform on [0, 1), so ``numel * p`` float64 uniforms (not ``numel``) give the exact mask as sorted flat
  indices. Applying it is one scaling pass and a sparse ``index_fill_``; backward keeps only the indices.
- larger ``p``: a dense mask from 15-bit uniform integers, four per 64-bit draw, compared straight into the input's
  dtype (``p`` rounded to a multiple of 2^-15, kept values scaled by the exact inverse of the rounded keep rate).

Both are unbiased and draw from the default generator, so gradient checkpointing (which restores it) replays the same
mask. Other devices use ``F.dropout`` (fused there). ``benchmarks/README.md`` has the timings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

RESOLUTION = 1 << 15     # the dense mask's uniform integers take values 0 .. 2^15 - 1
SPARSE_BELOW = 0.15      # below this p the positions are cheaper than the dense mask (benchmarks/README.md)


def keep_threshold(p: float) -> int:
    """Dense mask: integers below this are dropped, ``round(p * 2^15)``, at least 1 for p > 0."""
    return max(1, round(p * RESOLUTION)) if p > 0 else 0


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The dense scaled keep mask of ``shape``: ``1 / keep rate`` where kept, 0 where dropped, drop rate ``p``
    rounded to a multiple of 2^-15.

    The default generator's ``random_`` on int64 gives 63 uniform bits per element; read as four int16 lanes and
    masked to their low 15 bits, each lane is uniform on [0, 2^15). The comparison writes the mask straight into
    ``dtype`` (3x faster than a bool mask converted afterwards)."""
    numel = shape.numel()
    draws = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_()
    lanes = draws.view(torch.int16)[:numel].bitwise_and_(RESOLUTION - 1)
    threshold = keep_threshold(p)
    mask = torch.ge(lanes, threshold, out=torch.empty(numel, dtype=dtype, device=device))
    return mask.mul_(RESOLUTION / (RESOLUTION - threshold)).view(shape)


def drop_positions(numel: int, p: float, device: torch.device | None = None, batch: int | None = None) -> Tensor:
    """Sorted flat indices in ``[0, numel)``, each index present independently with probability ``p`` (0 < p < 1).

    Geometric gaps from float64 uniforms, ``batch`` at a time: by default ``numel * p`` draws plus six standard
    deviations, and another batch in the rare case they fall short of ``numel``."""
    log_keep = math.log1p(-p)
    mean = numel * p
    batch = batch or int(mean + 6 * math.sqrt(mean) + 16)
    ends, parts = -1, []
    while ends < numel:
        gaps = torch.rand(batch, dtype=torch.float64, device=device).neg_().log1p_().div_(log_keep).floor_()
        positions = gaps.to(torch.int64).add_(1).cumsum_(0).add_(ends)           # previous end + cumulative gaps
        parts.append(positions)
        ends = int(positions[-1])
    positions = parts[0] if len(parts) == 1 else torch.cat(parts)
    return positions[: int(torch.searchsorted(positions, numel))]


def draw_drop(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, float]:
    """One draw of the mask for tensors of ``shape``: ``(drop, scale)`` with ``drop`` the dropped flat indices
    (int64, ``p < SPARSE_BELOW``) or the dense scaled keep mask (``dtype``), and ``scale`` the kept elements'
    factor, ``1 / keep rate``. :func:`apply_drop` applies it to the input in forward and to its gradient in
    backward."""
    if p < SPARSE_BELOW:
        return drop_positions(shape.numel(), p, device), 1.0 / (1.0 - p)
    return keep_mask(shape, p, dtype, device), RESOLUTION / (RESOLUTION - keep_threshold(p))


def apply_drop(t: Tensor, drop: Tensor, scale: float, scaled: bool = True) -> Tensor:
    """A new contiguous tensor: ``t`` with the dropped elements zeroed and, if ``scaled``, the kept ones times
    ``scale``; ``drop`` and ``scale`` from :func:`draw_drop`."""
    if drop.dtype != torch.int64:                                   # the dense scaled keep mask
        return t * drop if scaled else t * (drop != 0)
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    if scaled:
        torch.mul(t, scale, out=out)
    else:
        out.copy_(t)
    return zero_dropped_(out, drop)


def zero_dropped_(t: Tensor, drop: Tensor) -> Tensor:
    """Zero the dropped elements of the contiguous ``t`` in place (no scaling); ``drop`` from :func:`draw_drop`."""
    if drop.dtype != torch.int64:
        return t.mul_(drop != 0)
    t.view(-1).index_fill_(0, drop, 0)
    return t


class _Dropout(torch.autograd.Function):
    """``apply_drop(x)`` forward and ``apply_drop(grad)`` backward, keeping only the draw (checkpointing-safe: it is
    saved with ``save_for_backward``); no double backward."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        drop, ctx.scale = draw_drop(x.shape, p, x.dtype, x.device)
        ctx.save_for_backward(drop)
        return apply_drop(x, drop, ctx.scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (drop,) = ctx.saved_tensors
        return apply_drop(grad, drop, ctx.scale), None


def lora_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout with ``nn.Dropout``'s semantics (identity in eval mode or at p = 0)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return _Dropout.apply(x, p)


class LoRADropout(nn.Module):
    """``nn.Dropout(p)`` for adapter inputs, with the CPU mask of :func:`draw_drop`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return lora_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
