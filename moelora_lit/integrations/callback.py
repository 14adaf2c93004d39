"""The Hugging Face ``TrainerCallback`` of MoELoRA: loss terms and routing statistics per logging interval, adapter
and queue files in every checkpoint (docs/design.md §3 and 7). The tags are those of the Lightning path."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from moelora_lit.adapter_io import ADAPTER_WEIGHTS, adapter_state_dict, is_queue_tensor, save_adapter
from moelora_lit.inject import check_checkpointing, moelora_layers
from moelora_lit.routing_stats import RoutingAccumulator, layer_metrics
from moelora_lit.training_step import LOSS_TERMS

QUEUES_FILE = "moelora_queues.safetensors"


def queue_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The contrastive queues (ring buffers, pointers, counts) of every MoELoRA layer, by full buffer name."""
    return {k: v for k, v in adapter_state_dict(model, include_queues=True).items()
            if is_queue_tensor(k)}


class MoELoRACallback(TrainerCallback):
    """Logs MoELoRA's loss terms and routing statistics, and writes adapter files into each checkpoint.

    Every logging step (``logging_steps``) it adds to the Trainer's log (``state.log_history`` and every logger the
    Trainer reports to): ``train/loss``, ``train/task_loss``, ``train/contrastive_loss``, ``train/balance_loss``,
    ``train/z_loss`` (weighted terms, averaged over the interval's optimizer steps and the ranks, as the Trainer's
    ``loss``, which is their sum), and per MoELoRA layer ``routing/entropy/<layer>`` (mean gate entropy per real
    token), ``routing/load_cv/<layer>``, ``routing/max_load/<layer>`` and ``routing/min_load/<layer>`` (of the experts'
    load shares), accumulated over every micro-batch of the interval and summed across ranks.

    At each save it writes ``moelora_queues.safetensors`` (the contrastive queues, for resuming) into
    ``checkpoint-<step>``, and the adapter files (``adapter_config.json``, ``adapter.safetensors``) if the Trainer
    did not. The loss terms come from :class:`~moelora_lit.integrations.transformers.MoELoRATrainer` or
    ``MoELoRASFTTrainer``, which add one of these callbacks themselves when none is given.

    Args:
        log_routing: also log the per-layer routing statistics.
    """

    def __init__(self, log_routing: bool = True) -> None:
        self.log_routing = log_routing
        self.connected = False  # set by the MoELoRA trainers, which report the loss terms
        self._names: list[str] = []
        self._layers: list[nn.Module] = []
        self._losses: Tensor | None = None       # (4,) this rank's summed loss terms since the last log
        self._routing: RoutingAccumulator | None = None
        self._steps = 0

    def find_layers(self, model: nn.Module) -> None:
        """Watch ``model``'s MoELoRA layers (called by the trainer at construction and at train start)."""
        found = list(moelora_layers(model))
        self._names = [name for name, _ in found]
        self._layers = [layer for _, layer in found]
        self._routing = None

    # ---------------------------------------------------------------- per micro-batch (from the trainer)
    @torch.no_grad()
    def record(self, terms: dict[str, Tensor]) -> None:
        """Add one micro-batch's loss terms (as they enter the optimised loss) and its layers' latest gates."""
        values = torch.stack([terms[k].detach().float().reshape(()) for k in LOSS_TERMS])    # (4,)
        self._losses = values if self._losses is None else self._losses + values
        if not (self.log_routing and self._layers):
            return
        gates = [layer.last_gates for layer in self._layers]
        if any(g is None for g in gates):
            return
        if self._routing is None:
            self._routing = RoutingAccumulator(len(self._layers), [g.shape[-1] for g in gates], gates[0].device)
        masks = [layer.last_token_mask for layer in self._layers]
        if all(g.shape == gates[0].shape for g in gates) and all(m is masks[0] for m in masks):
            self._routing.update(torch.stack(gates), masks[0])                            # (L, T, N), mask (T,)
        else:
            for row, (g, m) in enumerate(zip(gates, masks, strict=True)):
                self._routing.update(g, m, layer=row)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._steps += 1

    # ---------------------------------------------------------------- per logging interval (from Trainer.log)
    @torch.no_grad()
    def pop_metrics(self) -> dict[str, float]:
        """The interval's metrics (one all-reduce across ranks, one host sync), then a fresh interval.

        Call on every rank at the same time (the Trainer logs training metrics on all ranks)."""
        if self._losses is None:
            return {}
        routing = self._routing.packed.flatten() if self._routing is not None else self._losses.new_zeros(0)
        packed = torch.cat([self._losses, routing.to(self._losses.device)])
        world = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dist.all_reduce(packed)
        losses = (packed[:len(LOSS_TERMS)] / (world * max(self._steps, 1))).tolist()
        metrics = {f"train/{k}": v for k, v in zip(LOSS_TERMS, losses, strict=True)}
        metrics = {"train/loss": sum(losses), **metrics}
        if self._routing is not None:
            self._routing.load(packed[len(LOSS_TERMS):].view_as(self._routing.packed))
            stats = {k: v.cpu() for k, v in self._routing.stats().items()}
            counts = self._routing.count.tolist()
            metrics |= layer_metrics(self._names, stats, counts)
            self._routing.reset()
        self._losses, self._steps = None, 0
        return metrics

    # ---------------------------------------------------------------- Trainer events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        if not self.connected:
            raise ValueError("MoELoRACallback needs MoELoRATrainer or MoELoRASFTTrainer "
                             "(moelora_lit.integrations.transformers): a plain Trainer optimises the task loss only, "
                             "without MoELoRA's contrastive and balance losses and queue updates")
        if model is not None:
            check_checkpointing(model)  # reentrant checkpointing would silently zero the auxiliary losses
            self.find_layers(model)
        self._losses, self._steps = None, 0

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            return
        if not os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS)):
            save_adapter(model, folder)
        queues = {k: v.contiguous().cpu() for k, v in queue_state_dict(model).items()}
        if queues:
            save_file(queues, os.path.join(folder, QUEUES_FILE), metadata={"format": "pt"})
