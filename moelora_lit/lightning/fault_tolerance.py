"""Training-time reliability: a non-finite loss stops before it reaches the weights, SIGINT / SIGTERM become
"finish this step, save ``interrupted.ckpt``, stop", every fit ends with a resumable ``last.ckpt``, and
checkpoints carry the RNG states so a resumed run draws the same numbers as a straight one."""

from __future__ import annotations

import os
import random
import signal
import threading
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from moelora_lit.lightning.checks import NonFiniteLossError, TrainingInterrupted


# ----------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU + CUDA) RNG states as tensors and plain types (loadable with weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------- the callback
class FaultTolerance(L.Callback):
    """Non-finite loss guard, graceful SIGINT / SIGTERM, and exact-resume state (registered by the CLI).

    - Before each backward, one ``torch.isfinite(loss)`` check (one host sync per step): a NaN / inf loss
      raises :class:`NonFiniteLossError` naming the step and every ``train/*loss`` term, before the optimizer
      sees it; no checkpoint is written for that step, so the last checkpoint on disk is the last good one.
    - The first SIGINT (Ctrl-C) or SIGTERM during fit lets the current training step finish, saves
      ``<dirpath>/<filename>.ckpt`` at its end (where ``ModelCheckpoint(every_n_train_steps=...)`` saves, so
      ``fit --ckpt_path`` resumes from it exactly) and stops before the next step or validation. During
      validation it stops at once and saves (validation does not change the training state). A second Ctrl-C
      stops at once; inside a training step no checkpoint is written then (the step would be half done).
    - Other exceptions outside a training step also save that checkpoint, as Lightning's
      ``OnExceptionCheckpoint`` does. (That callback is not used directly: as a ``Checkpoint`` subclass it
      would replace the Trainer's default ``ModelCheckpoint``, and it also saves half-done steps.)
    - Every fit that ends normally leaves ``<dirpath>/last.ckpt``, saved where the run stops (after the step
      that reaches ``max_steps``, or at the end of the last epoch), so ``fit --ckpt_path .../last.ckpt`` with a
      larger budget continues exactly, even when the run never validated (the Trainer's ``ModelCheckpoint``
      saves only after validation when there is a validation loop).
    - Checkpoints carry the Python / NumPy / torch RNG states, restored when training resumes (dropout,
      noisy and random routers then draw the same numbers as in a straight run).

    Args:
        dirpath: folder of the interrupt checkpoint (default: the ModelCheckpoint folder, else
            ``<log_dir>/checkpoints``).
        filename: checkpoint name without ``.ckpt``.
        check_finite: stop on a non-finite training loss.
        handle_signals: handle SIGINT / SIGTERM during fit as above.
        final_checkpoint: write ``last.ckpt`` at the end of every fit.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "interrupted", check_finite: bool = True,
                 handle_signals: bool = True, final_checkpoint: bool = True) -> None:  # fmt: skip
        if not filename:
            raise ValueError("faults.filename must not be empty")
        self.dirpath, self.filename = dirpath, filename
        self.check_finite, self.handle_signals = check_finite, handle_signals
        self.final_checkpoint = final_checkpoint
        self._final_step: int | None = None  # global step of the last.ckpt written in this fit
        self.signum: int | None = None  # the signal that asked to stop
        self.saved_path: str | None = None
        self.saved_step: int | None = None
        self._trainer: L.Trainer | None = None  # set while training
        self._in_step = False
        self._previous: dict[int, Any] = {}
        self._rng_to_restore: dict[str, Any] | None = None

    # -------------------------------------------------------------------------- saving
    def checkpoint_path(self, trainer: L.Trainer, filename: str | None = None) -> str:
        dirpath = self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None)
        if dirpath is None:
            dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        return os.path.join(dirpath, f"{filename or self.filename}.ckpt")

    def _save_final(self, trainer: L.Trainer) -> None:
        """``last.ckpt`` once per final global step; not after an interrupt (that saved its own)."""
        if not self.final_checkpoint or self.signum is not None or self._final_step == trainer.global_step:
            return
        if trainer.sanity_checking or trainer.global_step == 0:
            return
        path = self.checkpoint_path(trainer, "last")
        trainer.save_checkpoint(path, weights_only=False)
        self._final_step = trainer.global_step
        rank_zero_info(f"saved {path} at global step {trainer.global_step} (resume with --ckpt_path {path})")

    def _save(self, trainer: L.Trainer, reason: str) -> None:
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # full state: optimizer, loops, callbacks
        self.saved_path, self.saved_step = path, trainer.global_step
        rank_zero_info(f"{reason}: saved {path} at global step {trainer.global_step}; resume with --ckpt_path {path}")

    @staticmethod
    def last_good_checkpoint(trainer: L.Trainer) -> str | None:
        """The newest checkpoint written by a ``ModelCheckpoint`` in this run, if any."""
        paths = []
        for callback in trainer.checkpoint_callbacks:
            paths += [getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")]
        paths = [p for p in paths if p and os.path.isfile(p)]
        return max(paths, key=os.path.getmtime) if paths else None

    def interrupt_message(self) -> str:
        name = signal.Signals(self.signum).name if self.signum is not None else "signal"
        return (f"interrupted by {name} at global step {self.saved_step}; checkpoint saved to {self.saved_path}. "
                f"Resume with the same command plus --ckpt_path {self.saved_path}")

    def _stop_if_saved(self) -> None:
        if self.signum is not None and self.saved_path is not None:
            raise TrainingInterrupted(self.interrupt_message(), self.signum, self.saved_path)

    # -------------------------------------------------------------------------- training steps
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        self.signum, self.saved_path, self.saved_step, self._trainer = None, None, None, trainer
        self._final_step = None
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        self._stop_if_saved()
        self._in_step = True

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self.check_finite and not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteLossError(self._nonfinite_message(trainer, loss))

    def _nonfinite_message(self, trainer: L.Trainer, loss: torch.Tensor) -> str:
        terms = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/") and "loss" in k}
        terms.setdefault("train/loss", loss.detach())
        shown = ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(terms.items()))
        last = self.last_good_checkpoint(trainer)
        resume = (f"last good checkpoint: {last} (resume with --ckpt_path {last})" if last
                  else "no checkpoint was saved before it")  # fmt: skip
        where = f"epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx}"
        return (f"non-finite training loss at global step {trainer.global_step} ({where}): "
                f"{shown}. The weights were not updated with it and no checkpoint was written for this step; "
                f"{resume}. Usual causes: a too high learning rate, a too small contrastive_temperature, "
                "or fp16 overflow (try bf16-mixed or 32-true).")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self._in_step = False
        stop = self.signum is not None
        if trainer.world_size > 1:  # every rank must save and stop together
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            self.signum = self.signum or (signal.SIGTERM if stop else None)
        if stop and self.saved_path is None:
            self._save(trainer, signal.Signals(self.signum).name)
        elif 0 < trainer.max_steps <= trainer.global_step:
            self._save_final(trainer)  # the loop stops after this batch: resume continues mid-epoch exactly

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs:
            self._save_final(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._stop_if_saved()  # do not validate after an interrupt: stop now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_final(trainer)  # any other end (early stopping, a time limit): resumable, at the epoch boundary
        self._trainer = None
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        training, self._trainer = self._trainer is not None, None
        self._restore_handlers()
        if isinstance(exception, (NonFiniteLossError, TrainingInterrupted)) or self.saved_path is not None:
            return
        if self._in_step:
            rank_zero_warn(f"{type(exception).__name__} inside a training step: no checkpoint written (the step was "
                           "half done); resume from the last checkpoint on disk")
        elif training and trainer.global_step > 0:
            self._save(trainer, type(exception).__name__)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    # -------------------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            trainer = self._trainer
            if trainer is not None and (trainer.validating or trainer.sanity_checking) and not self._in_step:
                rank_zero_info(f"\n{name} received during validation: stopping now")
                raise KeyboardInterrupt  # Lightning stops; on_exception saves (no training step is half done)
            rank_zero_info(f"\n{name} received: finishing this training step, then saving a checkpoint and "
                           "stopping" + (" (press Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""))
        elif signum == signal.SIGINT:
            self._restore_handlers()
            raise KeyboardInterrupt
        else:
            rank_zero_info(f"{name} received again: still finishing the step and saving")

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # -------------------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng")
