"""The adapter configuration: one validated dataclass (docs/design.md §1 and §2)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from moelora_lit.methods import (
    CONTRASTIVE_LAYOUTS,
    DEFAULT_LAYOUT,
    DEFAULT_PLACEMENT,
    LAYOUT_ROUTERS,
    LAYOUTS,
    METHODS,
    PLACEMENTS,
    ROUTERS,
)

BALANCE_LOSSES = ("cv2", "switch", "switch_topk", "localized")
AUX_REDUCTIONS = ("sum", "mean")
CONTRASTIVE_KERNELS = ("auto", "compiled", "attention")  # see moelora_lit.kernels


@dataclass
class MoELoRAConfig:
    """Hyper-parameters of MoELoRA (Luo et al., 2024, arXiv 2402.12851) and of the mixture-of-LoRA family.

    Defaults follow the first author's code: 8 experts, top-2, r=8, alpha=32, dropout 0.1 on
    ``q_proj`` and ``v_proj``, contrastive and balance weights 0.01. Note that r=8 with 8 experts gives
    a per-expert rank of 1, where the contrastive representation is only a sign; the reproduction
    configs in ``experiments/`` therefore use r=32.

    Args:
        method: the method's name (``moelora``, ``lora``, ``loramoe``, ``hydralora``, ``mola``, ``flylora``,
            ``mixlora``, :mod:`moelora_lit.methods`); it picks the default layout and placement.
        expert_layout: ``slices``, ``independent``, ``shared_a`` or ``fly`` (:mod:`moelora_lit.methods`); None takes
            the method's own.
        placement: ``linear`` (every target linear is a mixture) or ``ffn_block`` (MixLoRA: each MLP with gate, up
            and down projections becomes one block whose experts are whole FFNs, routed by one router; the other
            targets get plain LoRA of rank r); None takes the method's own.
        r: the method's own rank: the total rank for ``slices`` (expert i owns rank slice ``[i*s, (i+1)*s)``,
            ``s = r / N``) and ``fly``, the shared A's rank for ``shared_a``, each expert's rank for ``independent``.
        num_experts: number of experts N, or a list of counts for equal depth groups of the blocks (MoLA's
            ``[2, 4, 6, 8]``: one count per quarter); a list has at most one entry per block.
        top_k: experts kept per token by the ``topk``, ``noisy`` and ``implicit`` routers (ranks for ``fly``).
        lora_alpha: scaling numerator; the update is scaled by ``alpha / s`` (per-expert rank; ``alpha / r`` for
            the other layouts).
        lora_dropout: dropout on the adapter input.
        target_modules: list of exact module names or name suffixes (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``), or one string used as a full-match regex.
        router: ``topk`` (sparse, default), ``dense`` (softmax over all), ``noisy`` (noisy top-k),
            ``random`` (random gates, no trainable router: the baseline the paper argues against), ``implicit``
            (FlyLoRA: the top-k of the frozen projection plus a balancing bias; the ``fly`` layout only).
        contrastive_weight: weight of the contrastive loss (docs/design.md §1.3); 0 turns it off.
        contrastive_temperature: softmax temperature tau of the contrastive loss.
        contrastive_queue_size: FIFO queue length per expert (MoCo-style negatives/positives).
        balance_loss: ``cv2`` (squared coefficient of variation of importance), ``switch`` (expert shares sum to
            1), ``switch_topk`` (MixLoRA: shares of tokens, summing to k) or ``localized`` (LoRAMoE's localized
            balancing constraint over the samples' task groups, docs/design.md §10).
        localized_delta: LoRAMoE's delta: a sample's own expert group is weighted 1 + delta, the other 1 - delta.
        bias_update_rate: FlyLoRA's u: after each training step each rank's bias moves by
            ``u * sign(mean(c) - c_i)`` (c_i how often rank i was chosen).
        balance_weight: weight of the balance loss.
        z_loss_weight: weight of the router z-loss.
        aux_reduction: ``sum`` (author code) or ``mean`` of the per-layer auxiliary terms.
        contrastive_max_anchors: score at most this many anchors per layer and step in the contrastive loss,
            drawn uniformly from the real ones (an unbiased estimate of the same mean, at a fraction of the
            cost: the loss evaluates anchors x N x queue similarities). None (default) scores all of them.
            Every real anchor still enters the queue.
        contrastive_kernel: how the contrastive loss and the queue push run on CPU in float32 (docs/design.md §8,
            :mod:`moelora_lit.kernels`): ``auto`` (default: compiled by TorchInductor unless the environment
            variable ``MOELORA_COMPILE_CONTRASTIVE=0`` is set), ``compiled`` (always try to compile) or
            ``attention`` (never compile: PyTorch's fused attention kernel, same values to 1e-5, slower, no C++
            compiler needed). Other devices use the matmul path whatever the choice.
        contrastive_compact_cpu: on CPU, score real tokens only (padding is dropped with one host sync, free
            there); False keeps the fixed-shape, sync-free path other devices take. Same values either way.
    """

    method: str = "moelora"
    expert_layout: str | None = None
    placement: str | None = None
    r: int = 8
    num_experts: int | list[int] = 8
    top_k: int = 2
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    router: str = "topk"
    contrastive_weight: float = 0.01
    contrastive_temperature: float = 0.07
    contrastive_queue_size: int = 128
    balance_loss: str = "cv2"
    balance_weight: float = 0.01
    z_loss_weight: float = 0.0
    aux_reduction: str = "sum"
    contrastive_max_anchors: int | None = None
    contrastive_kernel: str = "auto"
    contrastive_compact_cpu: bool = True
    localized_delta: float = 0.1
    bias_update_rate: float = 0.001

    def __post_init__(self) -> None:
        def fail(name: str, problem: str) -> None:
            raise ValueError(f"MoELoRAConfig.{name}={getattr(self, name)!r}: {problem}")

        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.num_experts, tuple):
            self.num_experts = list(self.num_experts)
        self._check_family(fail)
        for name in ("r", "top_k", "contrastive_queue_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, "must be a positive integer")
        value = self.contrastive_max_anchors
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            fail("contrastive_max_anchors", "must be a positive integer, or null to score every anchor")
        counts = self.expert_counts
        if self.layout == "slices" and any(self.r % n for n in counts):
            n = next(n for n in counts if self.r % n)
            fail("r", f"must be divisible by num_experts={n} (each expert owns r/N ranks); "
                      f"try r={n * max(1, round(self.r / n))}")
        if self.layout == "fly":
            if self.top_k > self.r:
                fail("top_k", f"must be <= r={self.r} (FlyLoRA keeps top_k of the r ranks)")
        elif self.top_k > min(counts):
            fail("top_k", f"must be <= num_experts={min(counts)}")
        if self.balance_loss not in BALANCE_LOSSES:
            fail("balance_loss", f"unknown balance loss; choose one of {', '.join(BALANCE_LOSSES)}")
        if self.aux_reduction not in AUX_REDUCTIONS:
            fail("aux_reduction", f"choose one of {', '.join(AUX_REDUCTIONS)}")
        if self.contrastive_kernel not in CONTRASTIVE_KERNELS:
            fail("contrastive_kernel", f"choose one of {', '.join(CONTRASTIVE_KERNELS)} ('attention' needs no C++ "
                                       "compiler)")
        if not isinstance(self.contrastive_compact_cpu, bool):
            fail("contrastive_compact_cpu", "must be true or false")
        for name in ("contrastive_weight", "balance_weight", "z_loss_weight", "lora_alpha"):
            if not 0 <= float(getattr(self, name)) < float("inf"):
                fail(name, "must be a finite number >= 0")
        if self.router == "dense" and self.balance_loss == "switch" and self.balance_weight > 0:
            raise ValueError(
                "MoELoRAConfig.balance_loss='switch' with router='dense' is the constant 1 (every expert receives "
                "every token, so f_i = 1/N and sum P_i = 1): it cannot balance anything. Use balance_loss='cv2', "
                "router='topk', or balance_weight=0."
            )
        self._check_family_terms(fail)
        if not self.contrastive_temperature > 0:
            fail("contrastive_temperature", "must be > 0")
        if not 0 <= self.lora_dropout < 1:
            fail("lora_dropout", "must be in [0, 1)")
        if not self.target_modules or (
            isinstance(self.target_modules, list)
            and not all(isinstance(t, str) and t.strip(".") for t in self.target_modules)
        ):
            fail("target_modules", "give a non-empty list of module names / suffixes or a regex string")
        if self.contrastive_weight > 0 and self.expert_rank == 1:
            warnings.warn(
                f"MoELoRAConfig: r={self.r} with num_experts={self.num_experts} gives per-expert rank 1, "
                "so each expert's normalised representation is a sign and the contrastive loss degenerates; "
                "the paper's run scripts use r=32.",
                stacklevel=3,
            )

    def _check_family(self, fail) -> None:
        """The method, its layout, placement and router, and the expert count (before the numeric checks)."""
        if self.method not in METHODS:
            fail("method", f"unknown method; choose one of {', '.join(METHODS)}")
        if self.expert_layout is not None and self.expert_layout not in LAYOUTS:
            fail("expert_layout", f"unknown layout; choose one of {', '.join(LAYOUTS)}")
        if self.placement is not None and self.placement not in PLACEMENTS:
            fail("placement", f"unknown placement; choose one of {', '.join(PLACEMENTS)}")
        if self.router not in ROUTERS:
            fail("router", f"unknown router; choose one of {', '.join(ROUTERS)}")
        allowed = LAYOUT_ROUTERS[self.layout]
        if self.router not in allowed:
            fail("router", f"the {self.layout} layout cannot use this router; "
                           f"choose one of {', '.join(allowed)}")
        if self.block_placement == "ffn_block" and self.layout != "independent":
            fail("placement", "ffn_block experts are independent LoRAs; set expert_layout: independent")
        counts = self.num_experts if isinstance(self.num_experts, list) else [self.num_experts]
        if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
            fail("num_experts", "must be a positive integer or a non-empty list of them (one per depth group)")
        if isinstance(self.num_experts, list) and self.block_placement == "ffn_block":
            fail("num_experts", "a per-block list needs placement: linear")

    def _check_family_terms(self, fail) -> None:
        """Which auxiliary terms the layout and router can compute."""
        if self.contrastive_weight > 0 and self.layout not in CONTRASTIVE_LAYOUTS:
            fail("contrastive_weight", f"must be 0 for the {self.layout} layout: its experts have no "
                                       "representations of their own (layouts with them: "
                                       f"{', '.join(CONTRASTIVE_LAYOUTS)})")
        if self.contrastive_weight > 0 and self.block_placement == "ffn_block":
            fail("contrastive_weight", "must be 0 with placement ffn_block (its experts are whole FFNs)")
        if self.balance_loss == "localized" and self.balance_weight > 0 and min(self.expert_counts) % 2:
            fail("num_experts", "must be even for balance_loss localized (two expert groups of N/2)")
        for name in ("localized_delta", "bias_update_rate"):
            if not 0 <= float(getattr(self, name)) < float("inf"):
                fail(name, "must be a finite number >= 0")

    @property
    def layout(self) -> str:
        """The expert layout: ``expert_layout``, or the method's own when that is None."""
        return self.expert_layout or DEFAULT_LAYOUT[self.method]

    @property
    def block_placement(self) -> str:
        """The placement: ``placement``, or the method's own when that is None."""
        return self.placement or DEFAULT_PLACEMENT.get(self.method, "linear")

    @property
    def expert_counts(self) -> list[int]:
        """The expert count of each depth group (one entry for a single count)."""
        return list(self.num_experts) if isinstance(self.num_experts, list) else [self.num_experts]

    def experts_at(self, block: int | None, num_blocks: int | None) -> int:
        """Experts of a layer in block ``block`` of ``num_blocks`` (equal depth groups for a list)."""
        counts = self.expert_counts
        if len(counts) == 1 or block is None or not num_blocks:
            return counts[0]
        if len(counts) > num_blocks:
            raise ValueError(f"MoELoRAConfig.num_experts={self.num_experts!r}: {len(counts)} depth groups for a model "
                             f"with {num_blocks} blocks; give at most {num_blocks} counts")
        return counts[min(block * len(counts) // num_blocks, len(counts) - 1)]

    @property
    def expert_rank(self) -> int:
        """Rank of one expert: ``r / N`` for ``slices`` (the first group's N), 1 for ``fly`` (a rank is an expert),
        else ``r``."""
        if self.layout == "slices":
            return self.r // self.expert_counts[0]
        return 1 if self.layout == "fly" else self.r

    @property
    def scaling(self) -> float:
        """``alpha / s`` for ``slices`` as in the MoELoRA author code (LoRA's ``alpha / r`` at N = 1), else
        ``alpha / r``."""
        if self.layout == "slices":
            return self.lora_alpha / self.expert_rank
        return self.lora_alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MoELoRAConfig:
        """Build from a dict, refusing unknown keys (a typo must not silently fall back to a default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"MoELoRAConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)
