"""The Trainer glue shared by :class:`MoELoRATrainer` and :class:`MoELoRASFTTrainer` (docs/design.md §7): the
auxiliary terms in the loss, queue pushes after every backward, adapter-only saving and resuming."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers.trainer import TRAINING_ARGS_NAME

from moelora_lit.adapter_io import adapter_state_dict, load_adapter, load_adapter_state_dict, save_adapter
from moelora_lit.adapters import adapters_of
from moelora_lit.inject import set_token_mask
from moelora_lit.integrations.callback import QUEUES_FILE, MoELoRACallback
from moelora_lit.training_step import after_backward, step_loss


def all_gather_stack(tensor: Tensor) -> Tensor:
    """``(world, ...)``: ``tensor`` of every rank, stacked in rank order (``torch.distributed.all_gather``)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def check_moelora_model(model: nn.Module) -> None:
    """Refuse a model without MoELoRA layers (it would train nothing, or the whole base)."""
    if adapters_of(model) is None:
        raise ValueError(f"{type(model).__name__} has no MoELoRA layers: call "
                         "moelora_lit.inject_moelora(model, MoELoRAConfig(...)) before building the trainer")


@contextlib.contextmanager
def _adapters_attached(model: nn.Module | None) -> Iterator[None]:
    """Tell transformers' quantisation check that a quantised base carries trainable adapters (it recognises PEFT's
    marker only), for the duration of the Trainer's construction."""
    marker = "_hf_peft_config_loaded"
    flag = model is not None and getattr(model, "is_quantized", False) and not getattr(model, marker, False)
    if flag:
        setattr(model, marker, True)
    try:
        yield
    finally:
        if flag:
            setattr(model, marker, False)


class MoELoRATrainerMixin:
    """Loss, queue pushes, logging and saving of MoELoRA for a ``transformers.Trainer`` subclass (put it first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:
            check_moelora_model(model)
        with _adapters_attached(model):
            super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(f"{type(self).__name__} does not support nn.DataParallel (several GPUs in one process): "
                             "launch with torchrun or accelerate launch (DDP), or make one GPU visible")
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, MoELoRACallback)]
        if not callbacks:
            callbacks = [MoELoRACallback()]
            self.add_callback(callbacks[0])
        self.moelora_callback: MoELoRACallback = callbacks[0]
        self.moelora_callback.connected = True
        self.moelora_callback.find_layers(self.model)

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the rows' ``task_group`` column (LoRAMoE's localized balance loss): the Trainer's
        ``remove_unused_columns`` keeps only the model's forward arguments, and ``compute_loss`` pops it."""
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and "task_group" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "task_group"]

    # ------------------------------------------------------------------------------- loss
    def _loss_scaled_for_ga(self, num_items_in_batch: Tensor | int | None) -> bool:
        """Whether ``compute_loss``'s task loss is already normalised over the accumulated batch: the rule
        ``Trainer.training_step`` applies before it divides by the accumulation steps."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Any:
        """``L = L_task + w_cl sum L_cl + w_bal sum L_bal + w_z sum L_z`` (docs/design.md §1.5) in training.

        The auxiliary terms are per-micro-batch means: when the task loss is normalised over the accumulated batch
        they are divided by the accumulation steps (``training_step`` then divides nothing), otherwise
        ``training_step`` divides the sum. DDP averages every rank's gradient, as on the Lightning path.
        """
        core = self.model
        set_token_mask(core, inputs.get("attention_mask"))
        adapters_of(core).set_task_groups(inputs.pop("task_group", None))   # LoRAMoE's localized balance loss
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not core.training:
            set_token_mask(core, None)
            return result
        task = result[0] if return_outputs else result
        steps = max(int(getattr(self, "current_gradient_accumulation_steps", 1)), 1)
        scaled = self._loss_scaled_for_ga(num_items_in_batch)
        terms = step_loss(core, task, aux_divisor=steps if scaled else 1)
        # What each term adds to the optimizer step: the task loss already normalised, or divided by the Trainer.
        self.moelora_callback.record({k: v if k == "task_loss" and scaled else v / steps
                                      for k, v in terms.items() if k != "loss"})
        return (terms["loss"], *result[1:]) if return_outputs else terms["loss"]

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """The Trainer's step, then this micro-batch's anchors into the queues (docs/design.md §1.3), after
        backward so that a forward recomputed by gradient checkpointing saw the same queue. Under DDP every rank
        pushes all ranks' anchors in rank order, so the queues stay identical everywhere."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        core = self.model
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        after_backward(core, all_gather=all_gather_stack if distributed else None)
        set_token_mask(core, None)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (evaluation logs carry eval_loss): add the interval's MoELoRA metrics
            logs.update(self.moelora_callback.pop_metrics())
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------- files
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Adapter files (``adapter_config.json`` + ``adapter.safetensors``), the tokenizer and the training
        arguments: never the frozen base."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_adapter(self.model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume: the checkpoint's adapter tensors and contrastive queues (the base is the one given)."""
        model = self.model if model is None else model
        load_adapter(model, resume_from_checkpoint)
        queues_file = os.path.join(resume_from_checkpoint, QUEUES_FILE)
        if os.path.isfile(queues_file):  # the queues, checked and restored as a checkpoint's are
            state = {**adapter_state_dict(model), **load_file(queues_file)}
            load_adapter_state_dict(model, state, source=queues_file)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
