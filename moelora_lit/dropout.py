"""The adapters' input dropout: ``nn.Dropout``'s semantics with a cheaper mask on CPU.

On CPU, ``torch.nn.functional.dropout`` draws one float32 Bernoulli sample per element from the Mersenne twister
and keeps a float32 mask for backward; with dropout on every adapted projection (LoRAMoE, MoLA, MixLoRA: all seven,
and MixLoRA's down projection once per selected expert) the draws cost more than the adapters' matmuls. Here the
mask comes from 15-bit uniform integers, four per 64-bit draw, and backward keeps it as bools: the same Bernoulli
mask up to the resolution of the keep probability (``p`` rounded to a multiple of 2^-15, kept values scaled by the
exact inverse of the rounded keep rate, so the layer stays unbiased). Other devices use ``F.dropout`` (fused there).
``benchmarks/README.md`` has the timings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESOLUTION = 1 << 15     # the mask's uniform integers take values 0 .. 2^15 - 1


def keep_threshold(p: float) -> int:
    """Integers below this are dropped: ``round(p * 2^15)``, at least 1 for p > 0."""
    return max(1, round(p * RESOLUTION)) if p > 0 else 0


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[Tensor, float]:
    """A bool mask of ``shape`` (True: kept) with drop rate ``p`` rounded to 2^-15, and the scale of kept values.

    The default generator's ``random_`` on int64 gives 63 uniform bits per element; read as four int16 lanes and
    masked to their low 15 bits, each lane is uniform on [0, 2^15)."""
    numel = shape.numel()
    draws = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_()
    lanes = draws.view(torch.int16)[:numel].bitwise_and_(RESOLUTION - 1)
    threshold = keep_threshold(p)
    return (lanes >= threshold).view(shape), RESOLUTION / (RESOLUTION - threshold)


class _MaskedScale(torch.autograd.Function):
    """``x * mask * scale`` whose backward keeps the bool mask (1 byte per element, not a float mask)."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x * mask.to(x.dtype).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype).mul_(ctx.scale), None, None


def lora_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout with ``nn.Dropout``'s semantics (identity in eval mode or at p = 0)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    mask, scale = keep_mask(x.shape, p, x.device)
    return _MaskedScale.apply(x, mask, scale)


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
