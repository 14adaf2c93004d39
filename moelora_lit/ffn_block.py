"""MixLoRA's FFN block (Li et al., 2024, arXiv 2404.15159; docs/design.md §10): the MLP as the expert.

Expert e is the whole gated FFN with its own LoRA on the three frozen projections,

    E_e(x) = (W2 + s B2e A2e) [act((W1 + s B1e A1e) x) * ((W3 + s B3e A3e) x)],

and one float32 router per block (N x hidden, no bias, N(0, 0.02)) keeps the top-k experts of the block's input,
renormalised: ``y = sum_{e in topk} g_e E_e(x)``. The frozen W1 x and W3 x are computed once per token and shared by
its experts; W2 runs once per selected expert (the activation sits between the projections, so it cannot be
shared). Each projection's N LoRAs are one A (N*r x in) and one B (out x N*r). Only the selected experts run: the
(token, slot) pairs are sorted by expert and each expert's LoRAs run on its contiguous rows (the standard MoE
dispatch, a loop of N matmul pairs per projection), so the adapters cost k, not N, experts per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelora_lit.config import MoELoRAConfig
from moelora_lit.dropout import LoRADropout
from moelora_lit.grouped_lora import grouped_lora
from moelora_lit.layer import base_features
from moelora_lit.methods import FFN_PROJECTIONS
from moelora_lit.routed import RoutedAdapter, output_is_private
from moelora_lit.routers import route


def is_ffn_block(module: nn.Module) -> bool:
    """Whether ``module`` is a gated MLP that placement ``ffn_block`` accepts (gate, up and down projections)."""
    return all(isinstance(getattr(module, name, None), nn.Module) for name in FFN_PROJECTIONS) and callable(
        getattr(module, "act_fn", None))


class MixLoRAFFN(RoutedAdapter):
    """A frozen gated MLP (``mlp``) whose experts are the FFN with per-expert LoRAs, routed by one block router.

    Attributes:
        mlp: the wrapped MLP (its gate, up and down projections stay frozen).
        router: the block's router, float32.
        lora_A, lora_B: ``ModuleDict``s by projection (``gate_proj``, ``up_proj``, ``down_proj``), each an
            ``nn.Linear`` holding all N experts (A: N*r x in, B: out x N*r).
    """

    adapter_module_names: tuple[str, ...] = ("lora_A", "lora_B", "router")

    def __init__(self, mlp: nn.Module, config: MoELoRAConfig) -> None:
        super().__init__(config, config.expert_counts[0])
        if not is_ffn_block(mlp):
            raise TypeError(f"placement ffn_block needs an MLP with {', '.join(FFN_PROJECTIONS)} and act_fn "
                            f"(Llama, Mistral, Qwen2, SmolLM2), not {type(mlp).__name__}")
        self.mlp = mlp
        n, r = self.num_experts, config.r
        device = mlp.gate_proj.weight.device
        self.hidden, self.intermediate = base_features(mlp.gate_proj)
        self.in_features = self.hidden
        self.lora_dropout = LoRADropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        shapes = {"gate_proj": (self.hidden, self.intermediate), "up_proj": (self.hidden, self.intermediate),
                  "down_proj": (self.intermediate, self.hidden)}
        self.lora_A = nn.ModuleDict({k: nn.Linear(i, n * r, bias=False, device=device) for k, (i, _) in shapes.items()})
        self.lora_B = nn.ModuleDict({k: nn.Linear(n * r, o, bias=False, device=device) for k, (_, o) in shapes.items()})
        self.router = nn.Linear(self.hidden, n, bias=False, device=device, dtype=torch.float32)
        self.scaling = config.lora_alpha / r
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """A kaiming-uniform(a=sqrt(5)), B zeros (outputs equal the MLP's at init), router N(0, 0.02)."""
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in self.lora_B.values():
            nn.init.zeros_(b.weight)
        nn.init.normal_(self.router.weight, std=0.02)

    @property
    def router_name(self) -> str:
        return "block"

    def _projection(self, projection: str, inputs: Tensor, counts: list[int], base: Tensor,
                    owned: bool = False) -> Tensor:
        """``base + s * B_e A_e inputs`` of each row's expert: ``inputs`` (P, in) sorted by expert, after dropout,
        ``counts[e]`` rows of expert e, ``base`` (P, out) the frozen projection of the same rows, written into in
        place when ``owned`` (an intermediate of this forward that nothing else holds); returns (P, out).

        One matmul pair per expert with rows (the standard MoE dispatch), written into the rows of one output
        (:mod:`moelora_lit.grouped_lora`). It measured as fast as ``torch.nn.functional.grouped_mm`` with a custom
        backward on CPU (benchmarks/README.md), and it runs in every dtype and on every device."""
        a_weight, b_weight = self.lora_A[projection].weight, self.lora_B[projection].weight
        if base.dtype == b_weight.dtype and not torch.is_autocast_enabled(base.device.type):
            return grouped_lora(inputs, a_weight, b_weight, base, counts, self.scaling, in_place=owned)
        r = self.config.r                                                # e.g. a bf16 base, or autocast
        a_rows, b_cols = a_weight.split(r, 0), b_weight.split(r, 1)                    # N x (r, in), N x (out, r)
        parts = [F.linear(F.linear(x_e, a_rows[e]) * self.scaling, b_cols[e])
                 for e, x_e in enumerate(inputs.split(counts)) if counts[e]]
        delta = torch.cat(parts) if parts else base.new_zeros(0, base.shape[1], dtype=b_weight.dtype)
        return base + delta

    def forward(self, x: Tensor) -> Tensor:
        mlp, c, n = self.mlp, self.config, self.num_experts
        shape, tokens = x.shape, x.numel() // self.hidden
        x_flat = x.reshape(tokens, self.hidden)                                        # (T, H)
        mask = self._real_tokens(tokens, x.device)
        # Routed in float32 at least (MixLoRA), whatever dtype the block was cast to after injection (bf16-true
        # precision, model.double()): the router's weight follows such a cast, the input must match it.
        router_dtype = torch.promote_types(self.router.weight.dtype, torch.float32)
        logits = F.linear(x_flat.to(router_dtype), self.router.weight.to(router_dtype))   # (T, N)
        gates, chosen = route(logits, "topk", c.top_k, n, tokens, x_flat)             # (T, N), (T, K)
        # Dispatch: the (token, slot) pairs sorted by expert, P = T * K rows; each expert's rows are contiguous.
        flat = chosen.reshape(-1)                                                      # (P,)
        order = flat.argsort(stable=True)                                              # (P,)
        token_of = order.div(c.top_k, rounding_mode="floor")                           # (P,) each row's token
        counts = torch.bincount(flat, minlength=n).tolist()                            # host sync (free on CPU)
        weights = gates.gather(1, chosen).reshape(-1).index_select(0, order)           # (P,)
        adapter_dtype = self.lora_B["down_proj"].weight.dtype
        adapter_x = x_flat.to(adapter_dtype)                                           # (T, H)
        # Dropout on the T tokens, one mask per projection shared by a token's slots (half the random draws of
        # dropping the P sorted rows); the down projection's input differs per slot and is dropped per row.
        gate_x, up_x = (self.lora_dropout(adapter_x).index_select(0, token_of) for _ in range(2))   # (P, H)
        gate = self._projection("gate_proj", gate_x, counts, mlp.gate_proj(x_flat).index_select(0, token_of), True)
        up = self._projection("up_proj", up_x, counts, mlp.up_proj(x_flat).index_select(0, token_of), True)   # (P, I)
        hidden = mlp.act_fn(gate) * up                                                 # (P, I)
        down = self._projection("down_proj", self.lora_dropout(hidden.to(adapter_dtype)), counts,
                                mlp.down_proj(hidden.to(x.dtype)), output_is_private(mlp.down_proj))
        weighted = down * weights[:, None].to(down.dtype)                              # (P, H)
        out = weighted.new_zeros(tokens, self.hidden).index_add(0, token_of, weighted)  # (T, H)
        self.last_gates = gates.detach()
        self.last_token_mask = mask
        if self._aux_enabled():
            self._record_aux(None, gates, chosen, logits, mask)
        else:
            self.aux_group.record(self, None, None)
        return out.to(x.dtype).view(shape)

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden={self.hidden}, intermediate={self.intermediate}, experts={self.num_experts}, "
                f"top_k={c.top_k}, r={c.r}, scaling={self.scaling:g}")
