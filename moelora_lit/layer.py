"""The family's linear layer: a frozen linear plus a mixture of LoRA experts (docs/design.md §1.1 and §10)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelora_lit.config import MoELoRAConfig
from moelora_lit.dropout import LoRADropout
from moelora_lit.dropped_projection import dropped_projection
from moelora_lit.methods import CONTRASTIVE_LAYOUTS
from moelora_lit.queues import register_queue
from moelora_lit.routed import RoutedAdapter, in_backward, output_is_private
from moelora_lit.routers import implicit_route, route, sparse_random_projection

__all__ = ["MoELoRALinear", "base_features", "in_backward", "route"]


def base_features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight in x out)."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if type(base_layer).__name__ == "Conv1D" and getattr(base_layer, "weight", None) is not None:
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features
    raise TypeError(
        f"MoELoRA wraps nn.Linear or transformers' Conv1D layers, not {type(base_layer).__name__}; "
        "choose target_modules that name linear projections"
    )


class MoELoRALinear(RoutedAdapter):
    """A frozen linear layer plus a mixture of LoRA experts, in the layout ``config.layout``.

    Every layout computes ``y = W0 x + B flatten(e * g[..., None] * scaling)`` with ``e`` (T, N, s) the experts'
    projections of ``dropout(x)``: ``slices`` (MoELoRA) and ``independent`` (LoRAMoE, MoLA) read them from one A of
    N*s rows, ``shared_a`` (HydraLoRA) repeats one A's projection for N heads of B, and ``fly`` (FlyLoRA) keeps each
    of the r ranks of a frozen sparse A as an expert of width 1 with 0/1 gates. One matmul for A, one for B, the gates
    an elementwise product: no Python loop over experts. With one expert there is no router and the layer is LoRA.

    A training forward only records the inputs of its auxiliary terms (see :class:`RoutedAdapter`); queue pushes
    and FlyLoRA's bias update wait for the step's end (``after_backward``), so a forward that gradient checkpointing
    recomputes inside backward sees the same state and records nothing. The ``random`` router draws fresh gates from
    the global RNG in training; in eval mode it re-seeds a generator with :attr:`eval_seed` at every forward.
    """

    adapter_module_names: tuple[str, ...] = ("lora_A", "lora_B", "router", "router_noise", "rank_bias")

    def __init__(self, base_layer: nn.Module, config: MoELoRAConfig, num_experts: int | None = None) -> None:
        layout = config.layout
        n = config.r if layout == "fly" else (num_experts or config.expert_counts[0])
        super().__init__(config, n)
        self.in_features, self.out_features = base_features(base_layer)
        self.base_layer = base_layer
        self.layout = layout
        device = base_layer.weight.device
        r = config.r
        self.expert_dim = {"slices": r // n, "independent": r, "shared_a": r, "fly": 1}[layout]   # s
        a_rows = {"slices": r, "independent": n * r, "shared_a": r, "fly": r}[layout]
        b_cols = {"slices": r, "independent": n * r, "shared_a": n * r, "fly": r}[layout]
        self.lora_dropout = LoRADropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, a_rows, bias=False, device=device)
        self.lora_B = nn.Linear(b_cols, self.out_features, bias=False, device=device)
        routed = n > 1 and config.router not in ("random", "implicit")
        self.router = nn.Linear(self.in_features, n, bias=False, device=device) if routed else None
        self.router_noise = None
        if config.router == "noisy" and n > 1:
            self.router_noise = nn.Linear(self.in_features, n, bias=False, device=device)
            nn.init.zeros_(self.router_noise.weight)
        self.scaling = config.lora_alpha / (self.expert_dim if layout == "slices" else r)
        if layout == "fly":
            self.lora_A.weight.requires_grad_(False)                     # frozen sparse random projection
            self.register_buffer("rank_bias", torch.zeros(r, device=device))
            self.bias_counts: Tensor | None = None                       # (r,) this step's choices, until updated
        if layout in CONTRASTIVE_LAYOUTS:   # experts with representations of their own: a queue (empty when unused)
            register_queue(self, n, config.contrastive_queue_size, self.expert_dim, device)
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT LoRA init: A kaiming-uniform(a=sqrt(5)) (FlyLoRA: sparse random, frozen), B zeros (so outputs equal
        the base's at init), routers as ``nn.Linear``'s default."""
        if self.layout == "fly":
            with torch.no_grad():
                self.lora_A.weight.copy_(sparse_random_projection(self.config.r, self.in_features, self.config.top_k,
                                                                  generator))
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.router is not None:
            self.router.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        c, n = self.config, self.num_experts
        tokens = x.numel() // self.in_features
        x_2d = x.reshape(tokens, self.in_features)
        # The base runs on the (T, in) rows: its (T, out) output takes B's product with no reshaping around it.
        result = self.base_layer(x_2d)                                                # (T, out)
        x_flat = x_2d.to(self.lora_B.weight.dtype)                                    # (T, in)
        mask = self._real_tokens(tokens, x.device)
        a, router_logits = self._project(x_flat)                                       # (T, rows of A), (T, N)
        logits = None
        counting = self.layout == "fly" and self.training and torch.is_grad_enabled() and not in_backward()
        if counting and (left := self.take_bias_counts()) is not None:
            self.update_rank_bias(left)    # the previous step's update, if nobody applied it after its backward
        if self.layout == "fly":
            gates, chosen = implicit_route(a, self.rank_bias, c.top_k)                 # (T, r), (T, k)
            gate_scale = c.top_k * self.scaling                                        # 0/1 choice x scaling
        else:
            logits = router_logits
            noise_std = None
            if self.router_noise is not None and self.training:
                noise_std = F.softplus(self.router_noise(x_flat))
            generator = None
            if c.router == "random" and not self.training:               # reproducible evaluation
                generator = torch.Generator(device=x.device).manual_seed(self.eval_seed)
            gates, chosen = route(logits, c.router, c.top_k, n, tokens, x_flat, noise_std, generator)
            gate_scale = self.scaling
        experts = a.view(tokens, 1, -1).expand(tokens, n, -1) if self.layout == "shared_a" else a.view(tokens, n, -1)
        mixed = (experts * gates.to(a.dtype)[..., None]).reshape(tokens, -1)           # (T, N * s)
        b_weight = self.lora_B.weight
        if result.dtype == b_weight.dtype:
            # result + scaling * B mixed as one GEMM: the scaling rides in its alpha, the sum in its beta, and its
            # backward scales only the small (T, N * s) and (out, N * s) gradients. In place (no copy of the output)
            # unless a hook on the base could hold its output.
            if output_is_private(self.base_layer):
                result = result.addmm_(mixed, b_weight.t(), alpha=gate_scale)
            else:
                result = torch.addmm(result, mixed, b_weight.t(), alpha=gate_scale)
        else:                                                                          # e.g. a bf16 or 4-bit base
            result = result + (F.linear(mixed, b_weight) * gate_scale).to(result.dtype)

        self.last_gates = gates.detach()
        self.last_token_mask = mask
        if counting:
            weight = gates.new_ones(tokens) if mask is None else mask.to(gates.dtype)
            self.bias_counts = ((gates > 0).to(gates.dtype) * weight[:, None]).sum(0)   # (r,) real tokens only
        if self._aux_enabled():
            self._record_aux(experts if self.layout in CONTRASTIVE_LAYOUTS else None, gates, chosen, logits, mask)
        else:
            self.aux_group.record(self, None, None)   # no terms; an earlier forward's anchors stay pending
        return result.view(*x.shape[:-1], self.out_features)

    def _project(self, x_flat: Tensor) -> tuple[Tensor, Tensor | None]:
        """A's projection of ``dropout(x)`` and the router's logits of ``x`` (None without a router).

        The weights are read directly (``F.linear``), not through the submodules' calls: at decoding's few tokens
        per step a module call costs as much as the matmul it wraps. Training with dropout on CPU runs dropout, A
        and the router as one autograd function (:mod:`moelora_lit.dropped_projection`), except under autocast,
        whose casts belong to autograd's graph. With gradients on and no dropout, the router and A read the same
        input and run as one matmul against the stacked weights: fewer, larger matmuls forward and backward (the
        stacking copies N + rows-of-A weight rows, a few KB); without gradients (decoding, scoring) the copy would
        cost more than the second matmul it saves."""
        a_weight = self.lora_A.weight
        router_weight = None if self.router is None else self.router.weight
        dropout = self.lora_dropout
        p = dropout.p if isinstance(dropout, LoRADropout) and dropout.training else 0.0
        if p > 0 and x_flat.is_cpu and not torch.is_autocast_enabled("cpu"):   # autocast: autograd casts
            return dropped_projection(x_flat, a_weight, router_weight, p)
        dropped = x_flat if p == 0 else self.lora_dropout(x_flat)
        if router_weight is None:
            return F.linear(dropped, a_weight), None
        if dropped is x_flat and torch.is_grad_enabled() and router_weight.dtype == a_weight.dtype:
            both = F.linear(x_flat, torch.cat([a_weight, router_weight]))
            a, logits = both.split([a_weight.shape[0], self.num_experts], dim=1)
            return a, logits
        return F.linear(dropped, a_weight), F.linear(x_flat, router_weight)

    # ----------------------------------------------------------------------------- FlyLoRA's bias
    def take_bias_counts(self) -> Tensor | None:
        counts, self.bias_counts = getattr(self, "bias_counts", None), None
        return counts

    @torch.no_grad()
    def update_rank_bias(self, counts: Tensor) -> None:
        """FlyLoRA's balancing: ``d_i += u * sign(mean(c) - c_i)`` (under-used ranks rise), with ``c`` the step's
        choices per rank (all ranks' under data parallelism); in place, a buffer, training steps only."""
        counts = counts.to(self.rank_bias.device, torch.float32)
        self.rank_bias.add_(self.config.bias_update_rate * torch.sign(counts.mean() - counts))

    @property
    def router_name(self) -> str:
        """The router this layer runs: the config's, or ``none`` for a single expert (plain LoRA)."""
        return "none" if self.num_experts == 1 and self.layout != "fly" else self.config.router

    def extra_repr(self) -> str:
        c = self.config
        return (f"in={self.in_features}, out={self.out_features}, layout={self.layout}, r={c.r}, "
                f"experts={self.num_experts}, top_k={c.top_k}, router={self.router_name}, scaling={self.scaling:g}")
