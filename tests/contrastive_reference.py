"""Test-only forms of the contrastive loss of docs/design.md §1.3: one set of anchors at a time.

The library computes the loss per layer from raw projections (:func:`moelora_lit.losses.expert_contrastive_losses`);
these take the normalised anchors directly, so the tests can check the formula, the kernels and the gradient on
hand-sized examples. Import them with ``from contrastive_reference import contrastive_loss``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moelora_lit import kernels, losses


def contrastive_loss(anchors: Tensor, anchor_experts: Tensor, anchor_weight: Tensor, queue: Tensor,
                     queue_count: Tensor, temperature: float, kernel: str = "auto") -> Tensor:
    """MoCo-style contrastive loss of (A, s) normalised ``anchors`` against the per-expert queues (N, Q, s).

    Arguments as in :func:`moelora_lit.losses.loss_and_gradient`; ``kernel`` is the contrastive-kernel setting
    (:mod:`moelora_lit.kernels`). Returns the scalar loss, exactly 0 while the queues are empty.
    """
    return _ContrastiveLoss.apply(anchors, anchor_experts, anchor_weight, queue, queue_count, temperature, kernel)


def expert_contrastive_loss(projections: Tensor, chosen: Tensor, keep: Tensor, queue: Tensor, queue_count: Tensor,
                            temperature: float, scored: Tensor | None = None,
                            kernel: str = "auto") -> tuple[Tensor, Tensor]:
    """One layer's term of :func:`moelora_lit.losses.expert_contrastive_losses`: ``(loss, anchors)``."""
    return losses.expert_contrastive_losses(
        [(projections, chosen, keep, queue, queue_count, temperature, scored)], kernel)[0]


class _ContrastiveLoss(torch.autograd.Function):
    """:func:`contrastive_loss` with its closed-form gradient computed in the forward pass."""

    @staticmethod
    def forward(ctx, anchors, anchor_experts, anchor_weight, queue, queue_count, temperature, kernel):
        need_grad = ctx.needs_input_grad[0]
        with torch.autocast(device_type=anchors.device.type, enabled=False):
            eager = partial(losses.loss_and_gradient, partial(kernels.softmax_moments, need_expectation=need_grad))
            loss, grad, _ = losses.compiled_or_eager(bounded_loss_and_gradient, eager, kernel, anchors,
                                                     anchor_experts, anchor_weight, queue, queue_count, temperature)
            if need_grad:
                ctx.save_for_backward(grad.to(anchors.dtype))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None


def bounded_loss_and_gradient(*args):
    """:func:`moelora_lit.losses.loss_and_gradient` with the bounded moments (the form that is compiled)."""
    kernels.static_shapes(args)
    return losses.loss_and_gradient(kernels.bounded_softmax_moments, *args)
