"""Routing statistics without Lightning: gate entropy, expert load shares and their spread, and an on-device
accumulator of them over layers and steps (docs/design.md §3). Both the Lightning callback and the Hugging Face
integration read these."""

from __future__ import annotations

import torch
from torch import Tensor

# Per-layer routing tags (docs/design.md §3): ``routing/<tag>/<layer>`` from the statistic ``stats()[key]``.
LAYER_TAGS = {"entropy": "entropy", "load_cv": "cv", "max_load": "max", "min_load": "min"}


def layer_metrics(names: list[str], stats: dict[str, Tensor], counts: list[float]) -> dict[str, float]:
    """``routing/{entropy,load_cv,max_load,min_load}/<layer>`` for every layer that saw a token (stats on the host)."""
    return {f"routing/{tag}/{name}": float(stats[key][row])
            for row, name in enumerate(names) if counts[row] > 0 for tag, key in LAYER_TAGS.items()}


def gate_entropy(gates: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sum over real tokens of the gate entropy ``-sum_i g log g`` (0 log 0 = 0), and the real-token count.

    ``gates`` (..., T, N); ``mask`` (..., T) bool of real tokens or None (all real). Returns two (...) tensors.
    """
    g = gates.float()
    entropy = -torch.special.xlogy(g, g).sum(-1)                         # (..., T)
    if mask is None:
        return entropy.sum(-1), torch.full(entropy.shape[:-1], float(g.shape[-2]), device=g.device)
    w = mask.to(torch.float32).expand_as(entropy)
    return (entropy * w).sum(-1), w.sum(-1)


def load_shares(gate_sum: Tensor) -> Tensor:
    """Load share per expert, ``share_i = sum_t g[t,i] / sum_t sum_j g[t,j]`` (zeros where nothing was routed)."""
    gate_sum = gate_sum.float()
    return gate_sum / gate_sum.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def load_cv(shares: Tensor) -> Tensor:
    """Coefficient of variation over experts: population std (``unbiased=False``) / mean of the last dim.

    0 for a perfectly balanced router, ``sqrt(N - 1)`` when one expert takes everything. (The cv2
    balance loss of docs/design.md §1.4 uses the unbiased variance instead; this statistic is for monitoring.)
    """
    mean = shares.mean(-1)
    return shares.std(-1, correction=0) / mean.clamp_min(torch.finfo(torch.float32).tiny)


class RoutingAccumulator:
    """On-device running sums of routing statistics for L layers x N experts.

    Holds ``gate_sum`` (L, N) summed gates, ``routed`` (L, N) routed-slot counts (gates > 0),
    ``entropy_sum`` (L,) summed token entropies and ``count`` (L,) real tokens, all float32. ``num_experts`` may be
    one count per layer (MoLA's depth groups, MixLoRA's LoRA layers beside its blocks): N is then the largest, a
    layer's gates are padded with zeros, and the spread statistics (cv, min) are taken over its own experts only.
    """

    def __init__(self, num_layers: int, num_experts: int | list[int], device: torch.device | str | None = None) -> None:
        counts = num_experts if isinstance(num_experts, list) else [num_experts] * num_layers
        num_experts = max(counts)
        self.num_layers, self.num_experts = num_layers, num_experts
        self.valid = torch.arange(num_experts, device=device) < torch.tensor(counts, device=device)[:, None]  # (L, N)
        self.packed = torch.zeros(num_layers, 2 * num_experts + 2, device=device)   # one tensor: one all-reduce
        n = num_experts
        self.gate_sum, self.routed = self.packed[:, :n], self.packed[:, n:2 * n]
        self.entropy_sum, self.count = self.packed[:, 2 * n], self.packed[:, 2 * n + 1]

    def update(self, gates: Tensor, mask: Tensor | None = None, layer: int | slice = slice(None)) -> None:
        """Add gates (T, N) of one layer (``layer`` an int) or (L', T, N) of layers ``layer`` (a slice)."""
        g = gates.float()
        if g.shape[-1] < self.num_experts:                                      # a layer with fewer experts
            g = torch.nn.functional.pad(g, (0, self.num_experts - g.shape[-1]))
        ent, cnt = gate_entropy(g, mask)
        if mask is None:
            gate_sum, routed = g.sum(-2), (g > 0).sum(-2, dtype=torch.float32)
        else:
            w = mask.to(torch.float32)[..., None]                               # (..., T, 1)
            gate_sum, routed = (g * w).sum(-2), ((g > 0) * w).sum(-2)
        self.gate_sum[layer] += gate_sum
        self.routed[layer] += routed
        self.entropy_sum[layer] += ent
        self.count[layer] += cnt

    def reset(self) -> None:
        self.packed.zero_()

    def load(self, packed: Tensor) -> None:
        """Replace the sums with ``packed`` (e.g. the cross-rank sum of :attr:`packed`)."""
        self.packed.copy_(packed)

    def stats(self) -> dict[str, Tensor]:
        """``entropy`` (L,) mean per real token, ``load`` (L, N) shares, ``cv``/``max``/``min`` (L,) of the
        shares, ``routed`` (L, N) share of routed (token, slot) pairs per expert."""
        shares = load_shares(self.gate_sum)
        if bool(self.valid.all()):
            cv, low = load_cv(shares), shares.amin(-1)
        else:                                                                   # each layer over its own experts
            n = self.valid.sum(-1).clamp_min(1)
            mean = shares.sum(-1) / n
            std = (((shares - mean[:, None]) * self.valid).square().sum(-1) / n).sqrt()
            cv = std / mean.clamp_min(torch.finfo(torch.float32).tiny)
            low = shares.masked_fill(~self.valid, float("inf")).amin(-1)
        return {"entropy": self.entropy_sum / self.count.clamp_min(1), "load": shares, "cv": cv,
                "max": shares.amax(-1), "min": low, "routed": load_shares(self.routed)}
