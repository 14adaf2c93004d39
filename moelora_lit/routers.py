"""Routers of the mixture-of-LoRA family (docs/design.md §1.2 and §10): gates from router logits, or FlyLoRA's
implicit top-k of the frozen projection."""

from __future__ import annotations

import torch
from torch import Tensor


def route(
    logits: Tensor | None, router: str, top_k: int, num_experts: int, tokens: int, like: Tensor,
    noise_std: Tensor | None = None, generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Gates of docs/design.md §1.2. ``generator`` (random router only) draws the gates; None uses the global RNG.

    Returns:
        gates: (T, N), zero for experts a token does not use, rows summing to 1.
        chosen: (T, K) indices of the experts with non-zero gates (K = top_k for ``topk``/``noisy``,
            N for ``dense``/``random``), so contrastive anchors are gathered with fixed shapes.
    """
    if num_experts == 1:                                                # plain LoRA: one expert, no router
        return like.new_ones(tokens, 1, dtype=torch.float32), torch.zeros(tokens, 1, dtype=torch.long,
                                                                          device=like.device)
    if router == "random":
        weights = torch.rand(tokens, num_experts, device=like.device, dtype=torch.float32, generator=generator)
        gates = weights / weights.sum(-1, keepdim=True)
        return gates, torch.arange(num_experts, device=like.device).expand(tokens, num_experts)
    assert logits is not None
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))   # float32 at least; float64 stays
    if router == "dense":
        return logits.softmax(-1), torch.arange(num_experts, device=like.device).expand(tokens, num_experts)
    if noise_std is not None:                                           # noisy top-k, training only
        logits = logits + noise_std.float() * torch.randn_like(logits)
    kept, chosen = logits.topk(top_k, dim=-1)                           # (T, K)
    gates = torch.zeros_like(logits).scatter(-1, chosen, kept.softmax(-1))
    return gates, chosen


def implicit_route(projection: Tensor, bias: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """FlyLoRA's implicit router: keep the ``top_k`` ranks of ``projection + bias`` per token, ranked by signed value
    as the reference implementation does (its demo ranks magnitudes; docs/design.md §10).

    Returns:
        gates: (T, r) ``1 / top_k`` on the kept ranks (the routing statistics' gates), zero elsewhere.
        chosen: (T, top_k) the kept ranks.
    """
    dtype = torch.promote_types(projection.dtype, torch.float32)          # float32 at least; float64 stays
    chosen = (projection.detach().to(dtype) + bias.to(dtype)).topk(top_k, dim=-1).indices   # (T, k)
    gates = torch.zeros(projection.shape, device=projection.device, dtype=dtype)
    return gates.scatter(-1, chosen, 1.0 / top_k), chosen


def sparse_random_projection(rank: int, in_features: int, top_k: int, generator: torch.Generator | None = None,
                             device: torch.device | None = None) -> Tensor:
    """FlyLoRA's frozen A (r x in): each row has ``in * k / r`` non-zeros at random columns, drawn from N(0, 1/r^2)."""
    per_row = max(1, in_features * top_k // rank)
    columns = torch.rand(rank, in_features, generator=generator).argsort(-1)[:, :per_row]     # (r, p)
    mask = torch.zeros(rank, in_features).scatter(-1, columns, 1.0)
    values = torch.randn(rank, in_features, generator=generator) / rank
    return (values * mask).to(device)
