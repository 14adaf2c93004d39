"""Auxiliary losses of MoELoRA as pure functions of tensors (docs/design.md §1.3 and §1.4).

Every function takes fixed-shape tensors and a per-token weight (1 for real tokens, 0 for padding)
instead of boolean indexing, so nothing here synchronises with the host. Lookups by expert use
``index_select``, not ``tensor[index]``: on CPU advanced indexing takes a parallel path whose thread start-up
cost milliseconds per call where ``index_select`` costs microseconds (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moelora_lit import kernels


def compiled_or_eager(bounded: Callable, eager: Callable, kernel: str, *args) -> tuple:
    """``bounded(*args)`` compiled where the contrastive-kernel setting ``kernel`` allows it (on CPU in float32, see
    :mod:`moelora_lit.kernels`) and its shift bound (its last result) stays in range; else ``eager(*args)``.
    Compiled, the loss's small ops become a few fused loops: at 28 layers the eager version's small ops cost as much
    as the softmax itself."""
    first = args[0]
    if first.shape[0] > 0 and kernels.COMPILED.applies(kernel, bounded, first):
        result = kernels.COMPILED.run(bounded, *args)
        if result is not None and float(result[-1]) <= kernels.MAX_SHIFT:    # host sync, free on CPU
            return result
    return eager(*args)


def loss_and_gradient(moments: Callable, anchors: Tensor, anchor_experts: Tensor, anchor_weight: Tensor,
                       queue: Tensor, queue_count: Tensor, temperature: float):
    """``(loss, d loss / d anchors or None, what moments reports)`` of the contrastive loss of docs/design.md §1.3.

    For each anchor (token t routed to expert i) and queue entry q: ``logit = z . q / tau``; the positives are the
    entries of queue i, the candidates the entries of all queues, and the loss is the mean over (anchor, positive)
    pairs of ``-log softmax_candidates(logit)[positive]`` (exactly 0 while the queues are empty).

    The gradient is in closed form: with ``c_i`` filled entries in queue i, ``S_i`` their sum and ``lse_a`` the
    log-sum-exp of anchor a's logits over all filled entries, the sum over an anchor's positive pairs collapses to
    ``w_a * (z_a . S_i / tau - c_i * lse_a)``, whose gradient with respect to ``z_a`` is
    ``(w_a * c_i * (p_a @ queue) - w_a * S_i) / (tau * W)`` with ``p_a`` the softmax over candidates and ``W`` the
    number of pairs. So the (anchors, N*Q) logits live only inside ``moments``; the queue and the weights are
    constants (no gradient).

    Args:
        moments: ``moments(scaled, entries, bias)`` returns ``(lse, expected or None, extra)``, see
            :mod:`moelora_lit.kernels`.
        anchors: (A, s) L2-normalised expert representations.
        anchor_experts: (A,) long, the expert of each anchor.
        anchor_weight: (A,) float, 1 for a real anchor and 0 for padding.
        queue: (N, Q, s) earlier steps' representations (detached).
        queue_count: (N,) long, how many entries of each queue are filled.
        temperature: tau.
    """
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    num_experts, queue_size, dim = queue.shape
    filled = torch.arange(queue_size, device=queue.device) < queue_count[:, None]         # (N, Q)
    entries = torch.where(filled[..., None], queue.to(dtype), 0.0)                         # (N, Q, s)
    bias = torch.where(filled.reshape(-1), 0.0, kernels.MASKED_LOGIT).to(dtype)            # (N*Q,)
    scaled = anchors.to(dtype) * (1.0 / temperature)                                       # (A, s)
    count = filled.sum(1).to(dtype).index_select(0, anchor_experts)                        # (A,) c_i
    weight = anchor_weight.to(dtype)
    pair_weight = weight * count                                                           # (A,)
    total = pair_weight.sum().clamp_min(1.0)
    positive_sum = entries.sum(1).index_select(0, anchor_experts)                          # (A, s) S_i
    lse, expected, extra = moments(scaled, entries.reshape(num_experts * queue_size, dim), bias)
    loss = -(weight * (scaled * positive_sum).sum(-1) - pair_weight * lse).sum() / total
    grad = None
    if expected is not None:
        grad = (expected * pair_weight[:, None] - positive_sum * weight[:, None]) / (total * temperature)
    return loss, grad, extra


def expert_contrastive_losses(terms: list[tuple], kernel: str = "auto") -> list[tuple[Tensor, Tensor]]:
    """The contrastive loss of several layers' routed tokens (docs/design.md §1.3), as one autograd node.

    Each term is ``(projections, chosen, keep, queue, queue_count, temperature, scored)``:

    - projections: (T, N, s) ``A x`` per expert, before gating;
    - chosen: (T, K) long, each token's routed experts;
    - keep: (T, K) float, 1 for a real anchor (a real token with a non-zero gate), 0 otherwise;
    - queue (N, Q, s), queue_count (N,), temperature: the layer's queue and tau (:func:`loss_and_gradient`);
    - scored: optional (M,) long indices into the T*K anchors: score only those (the anchors are all returned).

    The anchors are ``normalize(projections[t, chosen[t, k]])``; the normalisation, the gather and the loss have
    their gradient computed in closed form in the forward pass. The layers' kernels (``kernel``: the
    contrastive-kernel setting, :mod:`moelora_lit.kernels`) run back to back, with one node's overhead for all of
    them (28 layers per step at the quickstart's shape, where a node per layer cost more than the kernels' work).

    Returns:
        Per term ``(loss, anchors)``: the scalar loss and the (T*K, s) detached anchors, to push into the queues.
    """
    flat = [value for term in terms for value in term]
    out = _ExpertContrastiveLosses.apply(len(terms), kernel, *flat)
    return [(out[i], out[len(terms) + i]) for i in range(len(terms))]


_ARGS = 7  # arguments of one term of expert_contrastive_losses


class _ExpertContrastiveLosses(torch.autograd.Function):
    """:func:`expert_contrastive_losses`; backward scales the gradients kept from the forward pass."""

    @staticmethod
    def forward(ctx, count, kernel, *flat):
        losses, anchors, grads = [], [], []
        eager = partial(_expert_loss_and_gradient, kernels.softmax_moments)
        with torch.autocast(device_type=flat[0].device.type, enabled=False):
            for i in range(count):
                term = flat[i * _ARGS:(i + 1) * _ARGS]
                loss, grad, anchor, _ = compiled_or_eager(_bounded_expert_loss_and_gradient, eager, kernel, *term)
                losses.append(loss)
                anchors.append(anchor)
                grads.append(grad.to(term[0].dtype))
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(*anchors)
        return (*losses, *anchors)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        grads = ctx.saved_tensors
        out: list[Tensor | None] = [None, None]
        for grad, grad_loss in zip(grads, grad_outputs[:len(grads)], strict=True):
            out += [grad * grad_loss.to(grad.dtype)] + [None] * (_ARGS - 1)
        return tuple(out)


def _expert_loss_and_gradient(moments: Callable, projections: Tensor, chosen: Tensor, keep: Tensor, queue: Tensor,
                              queue_count: Tensor, temperature: float, scored: Tensor | None):
    """``(loss, d loss / d projections, anchors, what moments reports)`` of one term of
    :func:`expert_contrastive_losses`."""
    tokens, _, dim = projections.shape
    norm = projections.norm(dim=-1, keepdim=True)                                        # F.normalize, eps 1e-12
    z = projections / norm.clamp_min(1e-12)                                              # (T, N, s)
    index = chosen[..., None].expand(-1, -1, dim)                                        # (T, K, s)
    anchors = z.gather(1, index).reshape(-1, dim)                                        # (T*K, s)
    experts, weight = chosen.reshape(-1), keep.reshape(-1)
    if scored is None:
        loss, grad, extra = loss_and_gradient(moments, anchors, experts, weight, queue, queue_count, temperature)
    else:
        loss, grad_scored, extra = loss_and_gradient(
            moments, anchors.index_select(0, scored), experts.index_select(0, scored),
            weight.index_select(0, scored), queue, queue_count, temperature)
        grad = torch.zeros_like(anchors).index_add_(0, scored, grad_scored)
    grad_z = torch.zeros_like(z).scatter_add_(1, index, grad.view(tokens, -1, dim))     # gather's backward
    # normalize's backward: project out the radial part, divide by the norm (below eps: plain division by eps).
    radial = z * (z * grad_z).sum(-1, keepdim=True) * (norm > 1e-12)
    return loss, (grad_z - radial) / norm.clamp_min(1e-12), anchors, extra


def _bounded_expert_loss_and_gradient(*args):
    """:func:`_expert_loss_and_gradient` with :func:`moelora_lit.kernels.bounded_softmax_moments` (compiled)."""
    kernels.static_shapes(args)
    return _expert_loss_and_gradient(kernels.bounded_softmax_moments, *args)


def compiled_push_queue(*args):
    """:func:`push_queue` as compiled on CPU: the entries' count is its only dynamic size."""
    kernels.static_shapes(args, dynamic=(3, 4, 5))
    return push_queue(*args)


@torch.no_grad()
def push_queue(
    queue: Tensor, queue_ptr: Tensor, queue_count: Tensor,
    entries: Tensor, entry_experts: Tensor, entry_weight: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Push this step's anchors into their experts' FIFO ring buffers, without host syncs.

    Returns new ``(queue, queue_ptr, queue_count)`` tensors rather than writing in place, because the
    old queue is still referenced by this step's autograd graph.

    Entries are taken in order; per expert only the newest ``Q`` of them are written, at
    ``(ptr + rank) % Q`` where ``rank`` is the entry's position among that expert's new entries.

    Args:
        queue: (N, Q, s) ring buffers; queue_ptr: (N,) next write slot; queue_count: (N,) filled slots.
        entries: (A, s) detached representations; entry_experts: (A,) long; entry_weight: (A,) 0 = skip.

    Several layers' queues are pushed at once with a leading layer dimension: queue (L, N, Q, s), queue_ptr and
    queue_count (L, N), and the entries layer after layer, A per layer: (L * A, s), (L * A,), (L * A,).
    """
    *_, num_experts, queue_size, dim = queue.shape
    layers = queue.numel() // (num_experts * queue_size * dim)
    experts = entry_experts.reshape(layers, -1)                                           # (L, A)
    valid = entry_weight.reshape(layers, -1) > 0                                          # (L, A)
    # Not F.one_hot: on CPU it checks the class range with .item(), a host sync.
    one_hot = (experts[..., None] == torch.arange(num_experts, device=experts.device)).long() * valid[..., None]
    rank = (one_hot.cumsum(1) * one_hot).sum(-1) - 1                                      # (L, A)
    new_count = one_hot.sum(1)                                                            # (L, N)
    ptr, count = queue_ptr.reshape(layers, num_experts), queue_count.reshape(layers, num_experts)
    keep = valid & (rank >= new_count.gather(1, experts) - queue_size)                   # newest Q only
    slot = (ptr.gather(1, experts) + rank) % queue_size
    dump = layers * num_experts * queue_size                                              # scratch row
    first = torch.arange(layers, device=experts.device)[:, None] * num_experts           # layer offsets
    index = torch.where(keep, (first + experts) * queue_size + slot, torch.full_like(slot, dump))
    flat = torch.cat([queue.reshape(dump, dim), queue.new_zeros(1, dim)])
    flat.index_copy_(0, index.reshape(-1), entries.reshape(-1, dim).to(queue.dtype))
    return (flat[:dump].view_as(queue), ((ptr + new_count) % queue_size).view_as(queue_ptr),
            (count + new_count).clamp(max=queue_size).view_as(queue_count))


def cv2_balance_loss(gates: Tensor, token_weight: Tensor) -> Tensor:
    """Squared coefficient of variation of expert importance (author code, docs/design.md §1.4).

    ``importance_i = sum_t g[t, i]``; ``L = Var(importance) / (Mean(importance)^2 + 1e-10)`` with
    the unbiased variance. Returns 0 for a single expert. Leading dimensions (layers) give one value each:
    gates (..., T, N), token_weight (..., T).
    """
    if gates.shape[-1] < 2:
        return gates.new_zeros(gates.shape[:-2])
    importance = (gates * token_weight[..., None]).sum(-2)                                # (..., N)
    importance = importance.float()
    mean = importance.mean(-1)
    # unbiased; Tensor.var() .item()s on CPU
    var = (importance - mean[..., None]).square().sum(-1) / (importance.shape[-1] - 1)
    return var / (mean**2 + 1e-10)


def switch_balance_loss(gates: Tensor, logits: Tensor, token_weight: Tensor, per_slot: bool = True) -> Tensor:
    """Switch-Transformer balance loss ``N * sum_i f_i * P_i`` (docs/design.md §1.4).

    ``f_i``: share of routed (token, slot) pairs sent to expert i (``per_slot``, summing to 1), or share of tokens
    that route to expert i (summing to k: MixLoRA's form, ``balance_loss="switch_topk"``); ``P_i``: mean
    full-softmax router probability of expert i over real tokens. Leading dimensions (layers) give one value each.
    """
    num_experts = gates.shape[-1]
    routed = (gates > 0).to(token_weight.dtype) * token_weight[..., None]                 # (..., T, N)
    total = routed.sum((-2, -1)) if per_slot else token_weight.sum(-1)
    f = routed.sum(-2) / total.clamp_min(1.0)[..., None]
    probs = torch.softmax(logits.float(), dim=-1) * token_weight[..., None]
    p = probs.sum(-2) / token_weight.sum(-1).clamp_min(1.0)[..., None]
    return num_experts * (f * p).sum(-1)


def z_loss(logits: Tensor, token_weight: Tensor) -> Tensor:
    """Router z-loss: mean over real tokens of ``logsumexp(logits)^2``; leading dimensions give one value each."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    return (lse.square() * token_weight).sum(-1) / token_weight.sum(-1).clamp_min(1.0)


def localized_balance_loss(gates: Tensor, token_weight: Tensor, groups: Tensor, delta: float) -> Tensor:
    """LoRAMoE's localized balancing constraint (docs/design.md §10): ``Var(vec(Q * I)) / (Mean(vec(Q * I))^2 +
    1e-10)`` (unbiased variance) with ``Q_bi`` the summed gate of expert i over sample b's real tokens (padding
    masked, unlike the reference) and ``I_bi = 1 + delta`` where expert i is in sample b's group (label 1: the first
    N/2 experts, label 0: the last N/2), ``1 - delta`` otherwise (any other label: ``1 - delta`` everywhere).

    gates (..., T, N) with T = B * S tokens in sample order, token_weight (..., T), groups (B,) long.
    """
    *lead, tokens, n = gates.shape
    batch = groups.numel()
    q = (gates.float() * token_weight[..., None]).reshape(*lead, batch, tokens // batch, n).sum(-2)   # (..., B, N)
    first = torch.arange(n, device=gates.device) < n // 2                                            # (N,)
    own = torch.where(groups[:, None] == 1, first, ~first) & (groups[:, None] >= 0) & (groups[:, None] <= 1)
    scaled = (q * torch.where(own, 1.0 + delta, 1.0 - delta)).flatten(-2)                           # (..., B*N)
    mean = scaled.mean(-1)
    var = (scaled - mean[..., None]).square().sum(-1) / (scaled.shape[-1] - 1)
    return var / (mean**2 + 1e-10)
