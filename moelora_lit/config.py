"""The adapter configuration: one validated dataclass (docs/design.md §1 and §2)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

ROUTERS = ("topk", "dense", "noisy", "random")
BALANCE_LOSSES = ("cv2", "switch")
AUX_REDUCTIONS = ("sum", "mean")
CONTRASTIVE_KERNELS = ("auto", "compiled", "attention")  # see moelora_lit.kernels


@dataclass
class MoELoRAConfig:
    """Hyper-parameters of MoELoRA (Luo et al., 2024, arXiv 2402.12851).

    Defaults follow the first author's code: 8 experts, top-2, r=8, alpha=32, dropout 0.1 on
    ``q_proj`` and ``v_proj``, contrastive and balance weights 0.01. Note that r=8 with 8 experts gives
    a per-expert rank of 1, where the contrastive representation is only a sign; the reproduction
    configs in ``experiments/`` therefore use r=32.

    Args:
        r: total LoRA rank; expert ``i`` owns rank slice ``[i*s, (i+1)*s)`` with ``s = r / num_experts``.
        num_experts: number of experts N (``r % N == 0``).
        top_k: experts kept per token by the ``topk`` and ``noisy`` routers.
        lora_alpha: scaling numerator; the update is scaled by ``alpha / s`` (per-expert rank).
        lora_dropout: dropout on the adapter input.
        target_modules: list of exact module names or name suffixes (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``), or one string used as a full-match regex.
        router: ``topk`` (sparse, default), ``dense`` (softmax over all), ``noisy`` (noisy top-k),
            ``random`` (random gates, no trainable router: the baseline the paper argues against).
        contrastive_weight: weight of the contrastive loss (docs/design.md §1.3); 0 turns it off.
        contrastive_temperature: softmax temperature tau of the contrastive loss.
        contrastive_queue_size: FIFO queue length per expert (MoCo-style negatives/positives).
        balance_loss: ``cv2`` (squared coefficient of variation of importance) or ``switch``.
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

    r: int = 8
    num_experts: int = 8
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

    def __post_init__(self) -> None:
        def fail(name: str, problem: str) -> None:
            raise ValueError(f"MoELoRAConfig.{name}={getattr(self, name)!r}: {problem}")

        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        for name in ("r", "num_experts", "top_k", "contrastive_queue_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, "must be a positive integer")
        value = self.contrastive_max_anchors
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            fail("contrastive_max_anchors", "must be a positive integer, or null to score every anchor")
        if self.r % self.num_experts:
            fail("r", f"must be divisible by num_experts={self.num_experts} (each expert owns r/N ranks); "
                      f"try r={self.num_experts * max(1, round(self.r / self.num_experts))}")
        if self.top_k > self.num_experts:
            fail("top_k", f"must be <= num_experts={self.num_experts}")
        if self.router not in ROUTERS:
            fail("router", f"unknown router; choose one of {', '.join(ROUTERS)}")
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
        if not self.contrastive_temperature > 0:
            fail("contrastive_temperature", "must be > 0")
        if not 0 <= self.lora_dropout < 1:
            fail("lora_dropout", "must be in [0, 1)")
        if not self.target_modules or (
            isinstance(self.target_modules, list)
            and not all(isinstance(t, str) and t.strip(".") for t in self.target_modules)
        ):
            fail("target_modules", "give a non-empty list of module names / suffixes or a regex string")
        if self.contrastive_weight > 0 and self.r // self.num_experts == 1:
            warnings.warn(
                f"MoELoRAConfig: r={self.r} with num_experts={self.num_experts} gives per-expert rank 1, "
                "so each expert's normalised representation is a sign and the contrastive loss degenerates; "
                "the paper's run scripts use r=32.",
                stacklevel=3,
            )

    @property
    def expert_rank(self) -> int:
        """Per-expert rank ``s = r / num_experts``."""
        return self.r // self.num_experts

    @property
    def scaling(self) -> float:
        """``alpha / s`` as in the author code (equals LoRA's ``alpha / r`` when N = 1)."""
        return self.lora_alpha / self.expert_rank

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
