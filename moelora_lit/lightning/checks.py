"""Failing early and readably, stopping on a non-finite loss, and interrupting and resuming exactly.

- :func:`describe_error` turns an exception (often wrapped by jsonargparse) into the one line the CLI prints.
- :func:`check_writable`: the pre-flight check that a log folder can be written to.
- :func:`check_output_dirs`, :func:`check_optimizer`, :func:`check_checkpoint`: pre-flight checks.

The training-time half lives in :mod:`moelora_lit.lightning.fault_tolerance` (non-finite loss, signals, the final
checkpoint) and :mod:`moelora_lit.data.resumable` (mid-epoch resume of the train loader).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the step was not applied."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled objects that ``weights_only=True`` loading refuses (they could run code)."""


class TrainingInterrupted(Exception):  # noqa: N818 (an event, not an error)
    """Fit stopped on SIGINT / SIGTERM after saving a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)
        self.checkpoint = checkpoint


# Errors that mean "the input is wrong" (config, paths, data) rather than "the code is wrong": the CLI prints
# them as one line. Anything else keeps its traceback.
USER_ERRORS = (ValueError, OSError, MisconfigurationException, argparse.ArgumentError, NonFiniteLossError,
               pickle.UnpicklingError)


# ----------------------------------------------------------------------------------------- error messages
def _chain(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ if err.__cause__ is not None else (None if err.__suppress_context__ else err.__context__)
    return chain


def _raised_in(err: BaseException, folder: str) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(folder)


def _is_parser_error(err: BaseException) -> bool:
    return isinstance(err, argparse.ArgumentError) or type(err).__module__.startswith("jsonargparse")


def is_user_error(err: BaseException) -> bool:
    """True when ``err`` is a bad input (printed as one line), False for a bug (traceback kept)."""
    chain = _chain(err)
    ours = [e for e in chain if _raised_in(e, PACKAGE_DIR)]
    if ours:  # our own code decided: only the error classes we raise on purpose count as bad input
        return isinstance(ours[-1], USER_ERRORS)
    return isinstance(err, USER_ERRORS) or any(_is_parser_error(e) for e in chain)


def describe_error(err: BaseException) -> str:
    """The message to print for ``err``: the cause that names the problem, not jsonargparse's wrapping.

    A ``ValueError`` raised by our own code while jsonargparse instantiated a class wins (``MoELoRAConfig.r=10:
    must be divisible by num_experts=4 ...``); a pure parser error becomes ``<key>: <innermost message>``
    (``model.adapter.r: Expected a <class 'int'>. Got value: abc``).
    """
    chain = _chain(err)
    ours = [e for e in chain if _raised_in(e, PACKAGE_DIR)]
    if ours:
        return str(ours[-1]).strip() or type(ours[-1]).__name__
    if isinstance(err, pickle.UnpicklingError):  # torch.load(weights_only=True) refused a legacy-format file
        lines = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        return _unsafe_message(None, lines[0] if lines else "weights_only=True")
    if not any(_is_parser_error(e) for e in chain):
        return str(err).strip() or type(err).__name__
    keys: list[str] = []
    for e in chain:
        match = re.match(r'\s*Parser key "([^"]+)"', str(e))
        if match and (not keys or keys[-1] != match[1]):
            keys.append(match[1])
    core = re.sub(r'^\s*Parser key "[^"]+":\s*', "", str(chain[-1]).strip())
    if isinstance(chain[-1], KeyError) and core.startswith(("'", '"')):
        core = core[1:-1]  # KeyError quotes its message
    return f"{'.'.join(keys)}: {core}" if keys else core


# ----------------------------------------------------------------------------------------- pre-flight
def check_writable(path: str | os.PathLike, key: str) -> None:
    """Create ``path`` if needed and write a probe file in it; raise ``PermissionError`` naming ``key`` if not."""
    text = os.fspath(path)
    if "://" in text:  # remote file systems (s3://, gs://) are left to the logger
        return
    folder = Path(text).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise PermissionError(f"{key}={text!r} is not writable ({reason}: {err.filename or text}); "
                              f"set {key} to a folder you can write to") from None


def check_output_dirs(trainer: L.Trainer) -> None:
    """Pre-flight: every folder the run will write (root dir, logger save dirs, explicit checkpoint dirs)."""
    check_writable(trainer.default_root_dir, "trainer.default_root_dir")
    for i, logger in enumerate(trainer.loggers):
        save_dir = getattr(logger, "save_dir", None) or getattr(logger, "root_dir", None)
        if save_dir:
            key = "trainer.logger" + (f"[{i}]" if len(trainer.loggers) > 1 else "") + ".save_dir"
            check_writable(save_dir, key)
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "dirpath", None):
            check_writable(callback.dirpath, f"{type(callback).__name__}.dirpath")


def check_optimizer(model: Any) -> None:
    """Pre-flight: build ``model.optimizer`` on a dummy parameter, so a bad argument fails before weights load."""
    factory = getattr(model, "optimizer_factory", None)
    if factory is None:
        return
    try:
        factory([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise ValueError(f"model.optimizer: {err}") from err


CKPT_ALIASES = ("last", "best", "hpc")


def _unsafe_message(ckpt_path: str | None, detail: str) -> str:
    where = f"ckpt_path={ckpt_path!r}" if ckpt_path else "checkpoint"
    return (f"{where}: refused to load: it holds pickled Python objects other than tensors and plain "
            f"data ({detail}), and unpickling those can run arbitrary code. Load only checkpoints you trust (see "
            "docs/security.md).")


def check_checkpoint(ckpt_path: str | None) -> None:
    """Pre-flight for ``--ckpt_path``: the file exists and holds no pickled objects that ``weights_only`` refuses.

    The globals are listed from the pickle without unpickling anything (``torch.serialization``), so a
    malicious file is refused before anything is built or run.
    """
    text = str(ckpt_path)
    if ckpt_path is None or ckpt_path in CKPT_ALIASES or "://" in text or text.startswith("registry"):
        return
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such file (fit writes <log_dir>/checkpoints/*.ckpt)")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(ckpt_path)
    except Exception:  # not a zip checkpoint (legacy format): torch.load(weights_only=True) decides
        return
    if unsafe:
        raise UnsafeCheckpointError(_unsafe_message(text, f"globals {', '.join(sorted(unsafe)[:5])}"))
