"""Auxiliary losses of MoELoRA as pure functions of tensors (DESIGN 1.3 and 1.4).

Every function takes fixed-shape tensors and a per-token weight (1 for real tokens, 0 for padding)
instead of boolean indexing, so nothing here synchronises with the host. Lookups by expert use
``index_select``, not ``tensor[index]``: on CPU advanced indexing takes a parallel path whose thread start-up
cost 15 ms per call on a busy 2-core machine (index_select: 10 us).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def contrastive_loss(
    anchors: Tensor,
    anchor_experts: Tensor,
    anchor_weight: Tensor,
    queue: Tensor,
    queue_count: Tensor,
    temperature: float,
) -> Tensor:
    """MoCo-style contrastive loss of DESIGN 1.3 against the per-expert queues.

    For each anchor (token t routed to expert i) and queue entry q: ``logit = z . q / tau``; the
    positives are the entries of queue i, the candidates the entries of all queues, and the loss is the
    mean over (anchor, positive) pairs of ``-log softmax_candidates(logit)[positive]``.

    Args:
        anchors: (A, s) L2-normalised expert representations.
        anchor_experts: (A,) long, the expert of each anchor.
        anchor_weight: (A,) float, 1 for a real anchor and 0 for padding.
        queue: (N, Q, s) earlier steps' representations (detached).
        queue_count: (N,) long, how many entries of each queue are filled.
        temperature: tau.

    Returns:
        Scalar loss; exactly 0 while the queues are empty.
    """
    return _ContrastiveLoss.apply(anchors, anchor_experts, anchor_weight, queue, queue_count, temperature)


_MASKED_LOGIT = -1e30  # finite stand-in for -inf: an unfilled slot gets probability exactly 0, never NaN


class _ContrastiveLoss(torch.autograd.Function):
    """:func:`contrastive_loss` with its gradient computed in the forward pass (closed form).

    With ``c_i`` filled entries in queue i, ``S_i`` their sum and ``lse_a`` the log-sum-exp of anchor a's
    logits over all filled entries, the sum over an anchor's positive pairs collapses to
    ``w_a * (z_a . S_i / tau - c_i * lse_a)``. The gradient with respect to ``z_a`` is
    ``(w_a * c_i * (p_a @ queue) - w_a * S_i) / (tau * W)`` with ``p_a`` the softmax over candidates and
    ``W`` the number of pairs. So the (anchors, N*Q) logits live only inside this call: one matmul, one
    softmax and one matmul back, and only the (A, s) gradient is kept for backward. The queue and the
    weights are constants (no gradient), as in the layer, where they are buffers and masks.
    """

    @staticmethod
    def forward(ctx, anchors, anchor_experts, anchor_weight, queue, queue_count, temperature):
        with torch.autocast(device_type=anchors.device.type, enabled=False):
            dtype = torch.promote_types(anchors.dtype, torch.float32)
            num_experts, queue_size, dim = queue.shape
            filled = torch.arange(queue_size, device=queue.device) < queue_count[:, None]        # (N, Q)
            entries = torch.where(filled[..., None], queue.to(dtype), 0.0)                       # (N, Q, s)
            flat = entries.reshape(num_experts * queue_size, dim)                                # (N*Q, s)
            # The unfilled-slot mask rides in the matmul as an extra column (anchors get a 1 there):
            # addmm's broadcast copy of a bias row into the (A, N*Q) output costs as much as the softmax.
            bias = torch.where(filled.reshape(-1, 1), 0.0, _MASKED_LOGIT).to(dtype)              # (N*Q, 1)
            keys = torch.cat([flat, bias], 1)                                                    # (N*Q, s+1)
            scaled = anchors.to(dtype) * (1.0 / temperature)                                     # (A, s)
            count = filled.sum(1).to(dtype).index_select(0, anchor_experts)                      # (A,) c_i
            weight = anchor_weight.to(dtype)
            pair_weight = weight * count                                                         # (A,)
            total = pair_weight.sum().clamp_min(1.0)
            positive_sum = entries.sum(1).index_select(0, anchor_experts)                        # (A, s) S_i
            need_grad = ctx.needs_input_grad[0]
            lse, expected = _logsumexp_and_expectation(F.pad(scaled, (0, 1), value=1.0), keys, need_grad)
            loss = -(weight * (scaled * positive_sum).sum(-1) - pair_weight * lse).sum() / total
            if need_grad:
                grad = expected * pair_weight[:, None] - positive_sum * weight[:, None]          # (A, s)
                ctx.save_for_backward((grad / (total * temperature)).to(anchors.dtype))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


# PyTorch's fused CPU attention kernel returns the softmax-weighted values *and* the log-sum-exp, computed
# block by block with an online softmax, so the (A, C) logits never leave the cache. Private op: if a
# release drops it, the matmul + softmax path below is used.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _logsumexp_and_expectation(lhs: Tensor, keys: Tensor, need_expectation: bool) -> tuple[Tensor, Tensor | None]:
    """``logsumexp(lhs @ keys.T, -1)`` and, if asked, ``softmax(lhs @ keys.T, -1) @ keys[:, :-1]``.

    ``lhs`` (A, s+1) and ``keys`` (C, s+1) carry the mask column last. ``keys`` also serve as the values:
    their last column is dropped from the result (masked slots have probability 0, or it is all-masked junk).
    On CPU in float32 this is one fused attention call with ``lhs`` as the queries: materialising the
    (A, C) logits costs a round trip to memory (about half of this loss's time at the benchmark size).
    Blocking the anchors by hand so each block stays in L2 was faster at 1 thread but slower at 2.
    """
    if lhs.is_cpu and lhs.dtype == torch.float32 and _CPU_FLASH is not None:
        out, lse = _CPU_FLASH(lhs[None, None], keys[None, None], keys[None, None], scale=1.0)
        return lse[0, 0], out[0, 0, :, :-1] if need_expectation else None
    logits = lhs @ keys.T                                                                    # (A, C)
    if not need_expectation:
        return torch.logsumexp(logits, -1), None
    top = logits.amax(-1)
    # In place on CPU: a second (A, C) allocation costs more than the softmax itself there.
    probs = torch.softmax(logits, -1, out=logits if logits.is_cpu else None)
    # The largest probability is 1 / sum exp(logit - max), so lse = max - log(max prob): two cheap amax
    # passes instead of logsumexp's second exp pass.
    flat = keys[:, :-1]                                                                      # (C, s)
    return top - probs.amax(-1).log(), (flat.T @ probs.T).T       # probs @ flat; this order is ~3x faster on CPU


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
    """
    num_experts, queue_size, dim = queue.shape
    valid = entry_weight > 0                                                              # (A,)
    # Not F.one_hot: on CPU it checks the class range with .item(), a host sync.
    experts = torch.arange(num_experts, device=entry_experts.device)
    one_hot = (entry_experts[:, None] == experts).long() * valid[:, None]                 # (A, N)
    rank = (one_hot.cumsum(0) * one_hot).sum(-1) - 1                                      # (A,)
    new_count = one_hot.sum(0)                                                            # (N,)
    keep = valid & (rank >= new_count.index_select(0, entry_experts) - queue_size)       # newest Q only
    slot = (queue_ptr.index_select(0, entry_experts) + rank) % queue_size
    dump = num_experts * queue_size                                                       # scratch row
    index = torch.where(keep, entry_experts * queue_size + slot, torch.full_like(slot, dump))
    flat = torch.cat([queue.reshape(dump, dim), queue.new_zeros(1, dim)])
    flat.index_copy_(0, index, entries.to(queue.dtype))
    return (flat[:dump].view_as(queue), (queue_ptr + new_count) % queue_size,
            (queue_count + new_count).clamp(max=queue_size))


def cv2_balance_loss(gates: Tensor, token_weight: Tensor) -> Tensor:
    """Squared coefficient of variation of expert importance (author code, DESIGN 1.4).

    ``importance_i = sum_t g[t, i]``; ``L = Var(importance) / (Mean(importance)^2 + 1e-10)`` with
    the unbiased variance. Returns 0 for a single expert.
    """
    if gates.shape[-1] < 2:
        return gates.new_zeros(())
    importance = (gates * token_weight[:, None]).sum(0)                                   # (N,)
    importance = importance.float()
    mean = importance.mean()
    var = (importance - mean).square().sum() / (importance.numel() - 1)  # unbiased; Tensor.var() .item()s on CPU
    return var / (mean**2 + 1e-10)


def switch_balance_loss(gates: Tensor, logits: Tensor, token_weight: Tensor) -> Tensor:
    """Switch-Transformer balance loss ``N * sum_i f_i * P_i`` (DESIGN 1.4).

    ``f_i``: share of routed (token, slot) pairs sent to expert i; ``P_i``: mean full-softmax
    router probability of expert i over real tokens.
    """
    num_experts = gates.shape[-1]
    routed = (gates > 0).to(token_weight.dtype) * token_weight[:, None]                   # (T, N)
    f = routed.sum(0) / routed.sum().clamp_min(1.0)
    probs = torch.softmax(logits.float(), dim=-1) * token_weight[:, None]
    p = probs.sum(0) / token_weight.sum().clamp_min(1.0)
    return num_experts * (f * p).sum()


def z_loss(logits: Tensor, token_weight: Tensor) -> Tensor:
    """Router z-loss: mean over real tokens of ``logsumexp(logits)^2``."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    return (lse.square() * token_weight).sum() / token_weight.sum().clamp_min(1.0)
