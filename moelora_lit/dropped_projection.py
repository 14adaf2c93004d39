"""A's projection of ``dropout(x)`` and the router's logits of ``x`` as one autograd function (CPU training).

Autograd would run dropout, A's matmul and the router's matmul as three nodes: dropout keeps its mask, A's matmul the
dropped input, and backward builds two (T, in) gradients for ``x`` (through the mask and through the router) and adds
them. Here forward zeroes the dropped elements of one copy of ``x`` (the scale ``1 / keep rate`` is applied to
the small (T, rows) projection instead), and backward writes ``x``'s gradient once: the mask's zeros go into the
(T, in) product ``(scale * dA) A``, and the router's term is accumulated into it in place (``addmm_``). Values and
gradients are those of ``F.linear(dropout(x), A), F.linear(x, R)`` with the same draw (tests/test_dropout.py); it saves
only what the gradients that are needed read (a frozen A: not the dropped copy), and it has no double backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from moelora_lit.dropout import apply_drop, draw_drop, zero_dropped_


class _DroppedProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, a_weight: Tensor, router_weight: Tensor | None, p: float):
        drop, scale = draw_drop(x.shape, p, x.dtype, x.device)
        dropped = apply_drop(x, drop, scale, scaled=False)                 # (T, in), zeros where dropped
        a = F.linear(dropped, a_weight).mul_(scale)                        # (T, rows)
        logits = None if router_weight is None else F.linear(x, router_weight)   # (T, N)
        ctx.scale = scale
        need_x, need_a, need_router = ctx.needs_input_grad[:3]
        ctx.save_for_backward(x if need_router else None, dropped if need_a else None, drop,
                              a_weight if need_x else None, router_weight if need_x else None)
        return a, logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_a: Tensor, grad_logits: Tensor | None):
        x, dropped, drop, a_weight, router_weight = ctx.saved_tensors
        need_x, need_a = ctx.needs_input_grad[:2]                          # the router's: x saved or not
        grad_a = grad_a * ctx.scale                                        # (T, rows)
        grad_x = grad_a_weight = grad_router = None
        if need_a:
            grad_a_weight = grad_a.t() @ dropped                           # (rows, in)
        if x is not None and grad_logits is not None:                      # the router's weight needs a gradient
            grad_router = grad_logits.t() @ x                              # (N, in)
        if need_x:
            grad_x = zero_dropped_(grad_a @ a_weight, drop)                # (T, in), zeros where dropped
            if router_weight is not None and grad_logits is not None:
                grad_x.addmm_(grad_logits, router_weight)
        return grad_x, grad_a_weight, grad_router, None


def dropped_projection(x: Tensor, a_weight: Tensor, router_weight: Tensor | None,
                       p: float) -> tuple[Tensor, Tensor | None]:
    """``(F.linear(dropout(x, p), a_weight), F.linear(x, router_weight) or None)`` for a 2-d ``x`` (T, in), one
    dropout draw from the default generator (:func:`moelora_lit.dropout.draw_drop`)."""
    return _DroppedProjection.apply(x, a_weight, router_weight, p)
