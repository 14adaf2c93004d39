"""LLM-Adapters' learning-rate schedule: linear warm-up, then linear decay to 0 at the last optimizer step.

``transformers.Trainer`` (which LLM-Adapters' ``finetune.py`` uses, ``warmup_steps=100``) multiplies the learning
rate by ``step / warmup`` during warm-up and by ``(total - step) / (total - warmup)`` afterwards. The run's length
is rarely known when a config is written, so ``total_steps`` may stay ``None``: :class:`ScheduleHorizon` (a
callback) then sets it from ``trainer.estimated_stepping_batches`` when training starts.

    model:
      lr_scheduler: {class_path: moelora_lit.lightning.schedules.WarmupLinearDecay, init_args: {warmup_steps: 100}}
    trainer:
      callbacks: [{class_path: moelora_lit.lightning.schedules.ScheduleHorizon}]
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupLinearDecay(LRScheduler):
    """Linear warm-up over ``warmup_steps``, then linear decay to 0 at ``total_steps`` (stepped per optimizer step).

    Until ``total_steps`` is known the rate stays at its peak after warm-up. Both counts are in the state dict, so a
    resumed run continues the same schedule.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 100, total_steps: int | None = None,
                 last_epoch: int = -1) -> None:
        if warmup_steps < 0 or (total_steps is not None and total_steps < 1):
            raise ValueError(f"warmup_steps must be >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate after ``step`` optimizer steps."""
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if self.total_steps is None:
            return 1.0
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


class ScheduleHorizon(L.Callback):
    """Sets ``total_steps`` of every :class:`WarmupLinearDecay` that has none to the run's optimizer steps."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for config in trainer.lr_scheduler_configs:
            scheduler: Any = config.scheduler
            if isinstance(scheduler, WarmupLinearDecay) and scheduler.total_steps is None:
                total = trainer.estimated_stepping_batches
                if total == float("inf"):
                    raise ValueError("WarmupLinearDecay: set trainer.max_epochs or max_steps, or give total_steps")
                scheduler.total_steps = int(total)
