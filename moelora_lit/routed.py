"""What every routed adapter of the family shares (a linear layer's mixture, a MixLoRA FFN block): the token mask,
the latest gates, the recording of the auxiliary terms' inputs into the owner's per-step state, and its adapter
tensors. The layers compute; :class:`moelora_lit.aux.AuxGroup` computes the terms; the model's
:class:`moelora_lit.adapters.MoELoRAAdapters` pushes and saves."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelora_lit.aux import AuxGroup
from moelora_lit.config import MoELoRAConfig
from moelora_lit.queues import QUEUE_BUFFERS, Entries, push_grouped


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass (e.g. a checkpointed forward being recomputed)."""
    return torch._C._current_graph_task_id() != -1


def output_is_private(module: nn.Module) -> bool:
    """Whether no hook can hold ``module``'s output: no forward or backward hooks on it and no global module hooks.
    Then an adapter may add into that output in place (a linear's backward does not read it); with a hook, a kept
    output would change under it, or a full backward hook's view would refuse the write."""
    hooks = torch.nn.modules.module
    return not (module._forward_hooks or module._backward_hooks or module._backward_pre_hooks
                or hooks._global_forward_hooks or hooks._global_backward_hooks or hooks._global_backward_pre_hooks)


class RoutedAdapter(nn.Module):
    """Base of the family's adapters.

    Attributes:
        config: the layer's own :class:`MoELoRAConfig` (the model's, with this layer's expert count).
        num_experts: experts routed per token choice (ranks for the ``fly`` layout).
        last_gates: detached (tokens, N) gates of the latest forward (read by routing callbacks).
        last_token_mask: (tokens,) bool mask of real tokens for ``last_gates``, or None (all real).
        token_mask: set by ``set_token_mask`` before a forward; used when its size matches the tokens of the input
            (ignored otherwise, e.g. in cached decoding steps).
        task_groups: (batch,) long task-group label per sample for the ``localized`` balance loss (-1: none).
        aux_group: the :class:`AuxGroup` holding this layer's auxiliary state (shared by a model's layers).
        eval_seed: seed of the ``random`` router in eval mode (set per layer by ``inject_moelora``).
    """

    adapter_module_names: tuple[str, ...] = ()     # submodules (and buffers) whose tensors an adapter file holds
    queue_tensor_names: tuple[str, ...] = QUEUE_BUFFERS

    def __init__(self, config: MoELoRAConfig, num_experts: int) -> None:
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        self.token_mask: Tensor | None = None
        self.task_groups: Tensor | None = None
        self.last_gates: Tensor | None = None
        self.last_token_mask: Tensor | None = None
        self.aux_group = AuxGroup()
        self.eval_seed = 0

    @property
    def aux_losses(self) -> dict[str, Tensor]:
        """Unweighted auxiliary terms of the latest training forward (the group computes waiting terms first)."""
        return self.aux_group.slot(self).losses

    @property
    def pending(self) -> Entries | None:
        """``(anchors (A, s), experts (A,), weights (A,))`` of the latest training forward, not yet pushed."""
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

    @property
    def device(self) -> torch.device:
        """Where the adapter's tensors live (read without walking the module)."""
        return self.router.weight.device if self.router is not None else self.lora_B.weight.device

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _real_tokens(self, tokens: int, device: torch.device) -> Tensor | None:
        """The token mask flattened to (T,) bool when it fits this input, else None (all real)."""
        mask = self.token_mask
        if mask is None or mask.numel() != tokens:
            return None
        return mask.reshape(tokens).to(device=device, dtype=torch.bool)

    def _aux_enabled(self) -> bool:
        c = self.config
        return self.training and torch.is_grad_enabled() and (
            c.contrastive_weight > 0 or c.balance_weight > 0 or c.z_loss_weight > 0)

    def _record_aux(self, projections: Tensor | None, gates: Tensor, chosen: Tensor, logits: Tensor | None,
                    mask: Tensor | None) -> None:
        """Record this forward's inputs of the auxiliary terms (docs/design.md §1.3-1.4, §10) in :attr:`aux_group`,
        which computes them into :attr:`aux_losses` (and the anchors into :attr:`pending`) when first read.

        ``projections`` (T, N, s): each expert's representation before gating (None: no contrastive term).
        """
        c = self.config
        # Gradient checkpointing re-running this forward inside backward: the same ops (their saved tensors must
        # match the first run's), but the terms were already used, so nothing is recorded or pushed.
        recomputed = in_backward()
        if not recomputed:
            self.push_pending()   # the previous step's anchors, if nobody pushed them after its backward
        tokens = gates.shape[0]
        weight = gates.new_ones(tokens) if mask is None else mask.to(gates.dtype)     # (T,)
        contrastive = None
        if c.contrastive_weight > 0 and projections is not None:
            contrastive = self._contrastive_inputs(projections, gates, chosen, weight, mask)
        routing = None  # routers without logits (random, implicit) have no balance or z terms
        if logits is not None and (c.balance_weight > 0 or c.z_loss_weight > 0):
            groups = None
            if c.balance_loss == "localized" and c.balance_weight > 0:
                groups = self.task_groups
                if groups is None or tokens % groups.numel():
                    raise ValueError("balance_loss localized needs a task-group label per sample: set task_group on "
                                     "each data.train entry (0 or 1), or choose another model.adapter.balance_loss")
                groups = groups.to(gates.device)
            routing = (gates, logits, weight, groups)
        if not recomputed:
            self.aux_group.record(self, contrastive, routing)

    def _contrastive_inputs(self, a: Tensor, gates: Tensor, chosen: Tensor, weight: Tensor,
                            mask: Tensor | None) -> tuple:
        """``(projections (T', N, s) float, chosen, keep, scored)``: one term of
        :func:`moelora_lit.losses.expert_contrastive_losses`."""
        c = self.config
        k, cl_a, cl_chosen, cl_gates, cl_weight = chosen.shape[1], a, chosen, gates, weight
        if mask is not None and a.is_cpu and c.contrastive_compact_cpu:
            # Score real tokens only: padding is often a third of a batch, and this loss is the costliest
            # term of a CPU step. The index is a host sync, free on CPU (devices keep fixed shapes).
            real = mask.nonzero().squeeze(1)                                           # (T',)
            cl_a, cl_chosen, cl_gates, cl_weight = (t.index_select(0, real) for t in (a, chosen, gates, weight))
        n_tok = cl_a.shape[0]
        keep = cl_weight[:, None] * (cl_gates.gather(1, cl_chosen) > 0)                 # (T, K) real anchors
        scored = None
        if c.contrastive_max_anchors is not None and n_tok * k > c.contrastive_max_anchors:
            # Real anchors first (weight 1 + u beats 0 + u), uniformly among them; fixed shape, no sync.
            scored = (torch.rand(n_tok * k, device=keep.device) + keep.reshape(-1)).topk(
                c.contrastive_max_anchors).indices
        return cl_a.float(), cl_chosen, keep.detach().to(torch.float32), scored

    @torch.no_grad()
    def push_pending(self, entries: Entries | None = None) -> None:
        """Write ``entries`` (default: :attr:`pending`) into the queue, in place, and clear :attr:`pending` (the
        model's owner pushes all layers at once after each backward; this is the single-layer fallback)."""
        taken = self.aux_group.take_pending([self])[0]
        if entries is not None or taken is not None:
            push_grouped([self], [taken if entries is None else entries])
