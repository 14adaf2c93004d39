"""Per-expert LoRA on rows sorted by expert (MixLoRA's dispatch) as one autograd function.

For rows ``inputs`` (P, in) whose first ``counts[0]`` rows belong to expert 0, the next ``counts[1]`` to expert 1
and so on, it returns ``base + scaling * B_e A_e inputs`` row by row, with ``A`` (N*r, in) and ``B`` (out, N*r)
holding the experts' LoRAs side by side. Autograd over a loop of per-expert matmuls would split the inputs and the
weights into views and ``cat`` the per-expert outputs, and its backward would ``cat`` every split's gradients
again: five copies of (P, in)- or (P, out)-sized data per projection. Here forward and backward write each
expert's matmuls straight into its rows of one output (``out=``, ``addmm_``): the base's rows themselves when
nothing else holds them (``in_place``), else a copy of them. Values and gradients are those of the loop
(tests/test_grouped_lora.py).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class _GroupedLoRA(torch.autograd.Function):
    # ``base`` comes first: autograd expects a tensor that a Function modifies in place (``mark_dirty``) to be its
    # first input when it is a view.
    @staticmethod
    def forward(ctx, base: Tensor, inputs: Tensor, a_weight: Tensor, b_weight: Tensor, counts: list[int],
                scaling: float, in_place: bool) -> Tensor:
        r = a_weight.shape[0] // len(counts)
        low = inputs.new_empty(inputs.shape[0], r)                               # (P, r), unscaled
        out = base if in_place else base.clone()                                 # (P, out)
        start = 0
        for e, rows in enumerate(counts):
            if rows:
                end = start + rows
                torch.mm(inputs[start:end], a_weight[e * r:(e + 1) * r].t(), out=low[start:end])
                out[start:end].addmm_(low[start:end], b_weight[:, e * r:(e + 1) * r].t(), alpha=scaling)
                start = end
        ctx.counts, ctx.scaling, ctx.r = counts, scaling, r
        ctx.save_for_backward(inputs, low, a_weight, b_weight)
        if in_place:
            ctx.mark_dirty(base)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        inputs, low, a_weight, b_weight = ctx.saved_tensors
        r, scaling = ctx.r, ctx.scaling
        need_inputs, need_a, need_b = ctx.needs_input_grad[1:4]
        grad_inputs = torch.empty_like(inputs) if need_inputs else None
        grad_a = torch.zeros_like(a_weight) if need_a else None                  # experts without rows: 0
        grad_b = torch.zeros_like(b_weight) if need_b else None                  # (out, N*r)
        grad_low = low.new_empty(low.shape)                                      # (P, r), scaled
        start = 0
        for e, rows in enumerate(ctx.counts):
            if not rows:
                continue
            end, cols = start + rows, slice(e * r, (e + 1) * r)
            g = grad_out[start:end]
            torch.mm(g, b_weight[:, cols], out=grad_low[start:end])
            grad_low[start:end].mul_(scaling)
            if need_b:
                grad_b[:, cols] = g.t() @ low[start:end]                         # (out, r)
            if need_a:
                torch.mm(grad_low[start:end].t(), inputs[start:end], out=grad_a[cols])
            if need_inputs:
                torch.mm(grad_low[start:end], a_weight[cols], out=grad_inputs[start:end])
            start = end
        if need_b:
            grad_b.mul_(scaling)
        return grad_out, grad_inputs, grad_a, grad_b, None, None, None


def grouped_lora(inputs: Tensor, a_weight: Tensor, b_weight: Tensor, base: Tensor, counts: list[int],
                 scaling: float, in_place: bool = False) -> Tensor:
    """``base + scaling * B_e A_e inputs`` for each expert ``e``'s ``counts[e]`` consecutive rows (P = sum of
    counts); ``inputs`` (P, in), ``a_weight`` (N*r, in), ``b_weight`` (out, N*r), ``base`` (P, out), all one dtype.
    With ``in_place`` the sum is written into ``base`` and returned: only for a tensor that nothing else holds
    (MixLoRA's gathered rows, or a module's output while no hook can hold it, ``routed.output_is_private``). No
    double backward."""
    return _GroupedLoRA.apply(base, inputs, a_weight, b_weight, counts, scaling, in_place)
