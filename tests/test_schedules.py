"""WarmupLinearDecay reproduces transformers' linear schedule; ScheduleHorizon fills in the run's length."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from moelora_lit.lightning.schedules import ScheduleHorizon, WarmupLinearDecay


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=3e-4)


def _lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_matches_transformers_linear_schedule():
    ours = _lrs(WarmupLinearDecay(_optimizer(), warmup_steps=10, total_steps=50), 55)
    theirs = _lrs(get_linear_schedule_with_warmup(_optimizer(), 10, 50), 55)
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours[0] == 0 and ours[10] == pytest.approx(3e-4) and ours[50] == 0 and ours[-1] == 0


def test_horizon_callback_sets_total_steps_and_state_dict_keeps_it():
    scheduler = WarmupLinearDecay(_optimizer(), warmup_steps=2)
    assert _lrs(scheduler, 5)[-1] == pytest.approx(3e-4)  # constant until the horizon is known
    trainer = SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)], estimated_stepping_batches=8)
    ScheduleHorizon().on_train_start(trainer, None)
    assert scheduler.total_steps == 8
    assert scheduler.state_dict()["total_steps"] == 8
    assert _lrs(scheduler, 4)[-1] == 0.0


def test_rejects_bad_counts():
    with pytest.raises(ValueError):
        WarmupLinearDecay(_optimizer(), warmup_steps=-1)
