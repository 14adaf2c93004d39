"""The adapters' input dropout: ``nn.Dropout``'s semantics with a cheaper mask on CPU.

On CPU, ``torch.nn.functional.dropout`` draws one float32 Bernoulli sample per element from the Mersenne twister
and keeps a float32 mask for backward; with dropout on every adapted projection (LoRAMoE, MoLA, MixLoRA: all seven,
and MixLoRA's down projection once per selected expert) the draws cost more than the adapters' matmuls. Here the
mask comes from 15-bit uniform integers, four per 64-bit draw, compared straight into the input's dtype: the
same Bernoulli mask up to the resolution of the keep probability (``p`` rounded to a multiple of 2^-15, kept values
scaled by the exact inverse of the rounded keep rate, so the layer stays unbiased). Other devices use
``F.dropout`` (fused there). ``benchmarks/README.md`` has the timings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESOLUTION = 1 << 15     # the mask's uniform integers take values 0 .. 2^15 - 1


def keep_threshold(p: float) -> int:
    """Integers below this are dropped: ``round(p * 2^15)``, at least 1 for p > 0."""
    return max(1, round(p * RESOLUTION)) if p > 0 else 0


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The scaled keep mask of ``shape``: ``1 / keep rate`` where kept, 0 where dropped, drop rate ``p`` rounded to
    a multiple of 2^-15.

    The default generator's ``random_`` on int64 gives 63 uniform bits per element; read as four int16 lanes and
    masked to their low 15 bits, each lane is uniform on [0, 2^15). The comparison writes the mask straight into
    ``dtype`` (3x faster than a bool mask converted afterwards)."""
    numel = shape.numel()
    draws = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_()
    lanes = draws.view(torch.int16)[:numel].bitwise_and_(RESOLUTION - 1)
    threshold = keep_threshold(p)
    mask = torch.ge(lanes, threshold, out=torch.empty(numel, dtype=dtype, device=device))
    return mask.mul_(RESOLUTION / (RESOLUTION - threshold)).view(shape)


def lora_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout with ``nn.Dropout``'s semantics (identity in eval mode or at p = 0); autograd keeps the scaled mask
    for backward, as ``F.dropout`` does."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return x * keep_mask(x.shape, p, x.dtype, x.device)


class LoRADropout(nn.Module):
    """``nn.Dropout(p)`` for adapter inputs, with the CPU mask of :func:`keep_mask`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return lora_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
