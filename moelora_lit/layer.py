"""The MoELoRA linear layer and its routers (docs/design.md §1.1 and §1.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelora_lit.aux import AuxGroup
from moelora_lit.config import MoELoRAConfig
from moelora_lit.queues import QUEUE_BUFFERS, Entries, push_grouped, register_queue


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
    if router == "random":
        weights = torch.rand(tokens, num_experts, device=like.device, dtype=torch.float32, generator=generator)
        gates = weights / weights.sum(-1, keepdim=True)
        return gates, torch.arange(num_experts, device=like.device).expand(tokens, num_experts)
    assert logits is not None
    logits = logits.float()
    if router == "dense":
        return logits.softmax(-1), torch.arange(num_experts, device=like.device).expand(tokens, num_experts)
    if noise_std is not None:                                           # noisy top-k, training only
        logits = logits + noise_std.float() * torch.randn_like(logits)
    kept, chosen = logits.topk(top_k, dim=-1)                           # (T, K)
    gates = torch.zeros_like(logits).scatter(-1, chosen, kept.softmax(-1))
    return gates, chosen


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass (e.g. a checkpointed forward being recomputed)."""
    return torch._C._current_graph_task_id() != -1


class MoELoRALinear(nn.Module):
    """A frozen linear layer plus a mixture of LoRA experts (docs/design.md §1.1).

    ``y = W0 x + (alpha / s) * B flatten(A dropout(x) reshaped (T, N, s) * g[..., None])``; expert i
    owns rows ``[i*s, (i+1)*s)`` of A and the same columns of B, so the adapter has exactly the
    parameters of a rank-r LoRA plus the router.

    Attributes:
        last_gates: detached (tokens, N) gates of the latest forward (read by routing callbacks).
        last_token_mask: (tokens,) bool mask of real tokens for ``last_gates``, or None (all real).
        token_mask: set by :func:`moelora_lit.inject.set_token_mask` before a forward; used when its
            size matches the tokens of the input (ignored otherwise, e.g. in cached decoding steps).
        aux_losses: unweighted auxiliary terms of the latest training forward (empty otherwise).
        pending: the latest training forward's anchors, not yet pushed into the queue.
        eval_seed: seed of the ``random`` router in eval mode (set per layer by ``inject_moelora``).
        aux_group: the :class:`moelora_lit.aux.AuxGroup` that holds this layer's auxiliary state (the model's
            :class:`~moelora_lit.adapters.MoELoRAAdapters` gives all its layers one; a group of its own otherwise).

    A training forward only records the inputs of its auxiliary terms in :attr:`aux_group`. They are computed, for
    every waiting layer of the group at once, when :attr:`aux_losses` or :attr:`pending` is first read (or the
    layer runs again, or its queue is pushed). Queue updates (docs/design.md §1.3) are deferred too: the forward's
    anchors, scored against the queue, are kept as :attr:`pending`; the model's owner pushes every layer's after
    each backward (``push_queues``, gathering all ranks' anchors under DDP); anchors nobody pushed are pushed by the
    next training forward. A forward that gradient checkpointing recomputes inside backward therefore sees
    the same queue, and records and pushes nothing (its terms were already used).

    The ``random`` router draws fresh gates from the global RNG in training; in eval mode it re-seeds a
    generator with :attr:`eval_seed` at every forward, so the same input gives the same gates and outputs.
    """

    # What an adapter file and a checkpoint hold (docs/design.md §9), asked by :mod:`moelora_lit.adapter_io`:
    # the trainable submodules' tensors, and the contrastive queue buffers (checkpoints only, never adapter files).
    adapter_module_names: tuple[str, ...] = ("lora_A", "lora_B", "router", "router_noise")
    queue_tensor_names: tuple[str, ...] = QUEUE_BUFFERS

    def __init__(self, base_layer: nn.Module, config: MoELoRAConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = base_features(base_layer)
        self.config = config
        self.base_layer = base_layer
        n, r, s = config.num_experts, config.r, config.expert_rank
        device = base_layer.weight.device
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device)
        self.router = None if config.router == "random" else nn.Linear(self.in_features, n, bias=False,
                                                                       device=device)
        self.router_noise = None
        if config.router == "noisy":
            self.router_noise = nn.Linear(self.in_features, n, bias=False, device=device)
            nn.init.zeros_(self.router_noise.weight)
        self.scaling = config.scaling
        register_queue(self, n, config.contrastive_queue_size, s, device)
        self.reset_adapter_parameters()
        self.token_mask: Tensor | None = None
        self.last_gates: Tensor | None = None
        self.last_token_mask: Tensor | None = None
        self.aux_group = AuxGroup()
        self.eval_seed = 0

    def reset_adapter_parameters(self) -> None:
        """PEFT LoRA init: A kaiming-uniform(a=sqrt(5)), B zeros (so outputs equal the base's at init)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.router is not None:
            self.router.reset_parameters()

    @property
    def aux_losses(self) -> dict[str, Tensor]:
        """Unweighted auxiliary terms of the latest training forward (the group computes waiting terms first)."""
        return self.aux_group.slot(self).losses

    @property
    def pending(self) -> Entries | None:
        """``(anchors (A, s), experts (A,), weights (A,))`` of the latest training forward, not yet pushed (the
        group computes waiting terms first)."""
        return self.aux_group.slot(self).pending

    @pending.setter
    def pending(self, entries: Entries | None) -> None:
        self.aux_group.slot(self).pending = entries

    def adapter_tensors(self, include_queues: bool = False) -> dict[str, Tensor]:
        """This layer's adapter tensors by state-dict key (``lora_A.weight`` ...), optionally with its queue buffers;
        the live tensors, detached (writing into them changes the layer)."""
        return {key: tensor.detach() for key, tensor in self.state_dict(keep_vars=True).items()
                if key.split(".", 1)[0] in self.adapter_module_names
                or (include_queues and key in self.queue_tensor_names)}

    def _aux_enabled(self) -> bool:
        c = self.config
        return self.training and torch.is_grad_enabled() and (
            c.contrastive_weight > 0 or c.balance_weight > 0 or c.z_loss_weight > 0
        )

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)                                      # (..., out)
        c = self.config
        tokens = x.numel() // self.in_features
        x_flat = x.reshape(tokens, self.in_features).to(self.lora_A.weight.dtype)       # (T, in)
        logits = self.router(x_flat) if self.router is not None else None              # (T, N)
        noise_std = None
        if self.router_noise is not None and self.training:
            noise_std = F.softplus(self.router_noise(x_flat))
        generator = None
        if c.router == "random" and not self.training:                  # reproducible evaluation
            generator = torch.Generator(device=x.device).manual_seed(self.eval_seed)
        gates, chosen = route(logits, c.router, c.top_k, c.num_experts, tokens, x_flat, noise_std, generator)
        a = self.lora_A(self.lora_dropout(x_flat))                                     # (T, r)
        scaled = (gates * self.scaling).to(a.dtype)                                    # (T, N)
        mixed = (a.view(tokens, c.num_experts, -1) * scaled[..., None]).view(tokens, -1)  # (T, r)
        delta = self.lora_B(mixed)                                                     # (T, out)
        result = result + delta.view(result.shape).to(result.dtype)

        mask = self.token_mask
        if mask is not None and mask.numel() != tokens:
            mask = None
        mask = None if mask is None else mask.reshape(tokens).to(device=x.device, dtype=torch.bool)
        self.last_gates = gates.detach()
        self.last_token_mask = mask
        if self._aux_enabled():
            self._aux(a, gates, chosen, logits, mask)
        else:
            self.aux_group.record(self, None, None)   # no terms; an earlier forward's anchors stay pending
        return result

    def _aux(self, a: Tensor, gates: Tensor, chosen: Tensor, logits: Tensor | None, mask: Tensor | None) -> None:
        """Records this forward's inputs of the auxiliary terms of docs/design.md §1.3-1.4 in :attr:`aux_group`,
        which computes them into :attr:`aux_losses` (and the anchors into :attr:`pending`) when they are first read."""
        c = self.config
        # Gradient checkpointing re-running this forward inside backward: the same ops (their saved tensors must
        # match the first run's), but the terms were already used, so nothing is recorded or pushed.
        recomputed = in_backward()
        if not recomputed:
            self.push_pending()   # the previous step's anchors, if nobody pushed them after its backward
        tokens = gates.shape[0]
        weight = gates.new_ones(tokens) if mask is None else mask.to(gates.dtype)     # (T,)
        contrastive = None
        if c.contrastive_weight > 0:
            k, cl_a, cl_chosen, cl_gates, cl_weight = chosen.shape[1], a, chosen, gates, weight
            if mask is not None and a.is_cpu and c.contrastive_compact_cpu:
                # Score real tokens only: padding is often a third of a batch, and this loss is the costliest
                # term of a CPU step. The index is a host sync, free on CPU (devices keep fixed shapes).
                real = mask.nonzero().squeeze(1)                                       # (T',)
                cl_a, cl_chosen, cl_gates, cl_weight = (t.index_select(0, real) for t in (a, chosen, gates, weight))
            n_tok = cl_a.shape[0]
            keep = cl_weight[:, None] * (cl_gates.gather(1, cl_chosen) > 0)             # (T, K) real anchors
            scored = None
            if c.contrastive_max_anchors is not None and n_tok * k > c.contrastive_max_anchors:
                # Real anchors first (weight 1 + u beats 0 + u), uniformly among them; fixed shape, no sync.
                scored = (torch.rand(n_tok * k, device=keep.device) + keep.reshape(-1)).topk(
                    c.contrastive_max_anchors).indices
            contrastive = (cl_a.view(n_tok, c.num_experts, -1).float(), cl_chosen, keep.detach().to(torch.float32),
                           scored)
        routing = None
        if logits is not None and (c.balance_weight > 0 or c.z_loss_weight > 0):
            routing = (gates, logits, weight)
        if not recomputed:
            self.aux_group.record(self, contrastive, routing)

    @torch.no_grad()
    def push_pending(self, entries: Entries | None = None) -> None:
        """Write ``entries`` (default: :attr:`pending`) into the queues, in place, and clear :attr:`pending`.

        In place, so DDP's buffer broadcast and the optimizer-free checkpoint both see the new queue.
        """
        taken = self.aux_group.take_pending([self])[0]
        if entries is not None or taken is not None:
            push_grouped([self], [taken if entries is None else entries])

    def extra_repr(self) -> str:
        c = self.config
        return (f"in={self.in_features}, out={self.out_features}, r={c.r}, experts={c.num_experts}, "
                f"top_k={c.top_k}, router={c.router}, scaling={self.scaling:g}")
