"""``python -m moelora_lit fit|validate|test|predict --config X.yaml`` (LightningCLI).

Bad input (config, paths, data) ends in one ``error: <message>`` line on stderr and exit code 2, a
non-finite loss in exit code 1, SIGINT / SIGTERM during fit in a checkpoint and exit code 130 / 143.
``MOELORA_DEBUG=1`` shows the full traceback instead.
Two tools run before LightningCLI: ``python -m moelora_lit data prepare --source SRC --out DIR`` (LLM-Adapters'
data, checksummed; :mod:`moelora_lit.data.prepare`) and ``python -m moelora_lit report RUN_DIR... [--csv FILE]``
(:mod:`moelora_lit.eval.report`); ``python -m moelora_lit lm-eval --config X.yaml --tasks T`` runs
lm-evaluation-harness on the built model (:mod:`moelora_lit.lightning.harness_run`); ``python -m moelora_lit describe
--config X.yaml`` prints what a config builds, as JSON (:mod:`moelora_lit.lightning.describe_run`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

from moelora_lit.data import ReasoningDataModule
from moelora_lit.lightning.checks import (
    NonFiniteLossError,
    TrainingInterrupted,
    describe_error,
    is_user_error,
)
from moelora_lit.lightning.cli import RUNTIME_KEYS, SUBCOMMANDS, MoELoRACLI, best_checkpoint  # noqa: F401 (re-exported)
from moelora_lit.lightning.module import MoELoRAModule


def _run_tool(args: list[str]) -> int | None:
    """``data prepare``, ``report``, ``lm-eval`` and ``describe``: their exit code; None for LightningCLI's commands."""
    if args[:2] == ["data", "prepare"]:
        from moelora_lit.data.prepare import main as prepare

        return prepare(args[2:])
    if args[:1] == ["lm-eval"]:
        from moelora_lit.lightning.harness_run import main as harness

        return harness(args[1:])
    if args[:1] == ["describe"]:
        from moelora_lit.lightning.describe_run import main as describe

        return describe(args[1:])
    if args[:1] == ["report"]:
        from moelora_lit.eval.report import main as report

        return report(args[1:])
    return None


class _QuietStartup(logging.Filter):
    """Drops Lightning's start-up advertisements (cloud logging / model registry tips) and the TPU line."""

    NOISE = ("💡 Tip:", "TPU available:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def quiet_startup() -> None:
    """Install :class:`_QuietStartup` once on Lightning's rank-zero logger."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _QuietStartup) for f in logger.filters):
        logger.addFilter(_QuietStartup())


def main(args: list[str] | None = None) -> MoELoRACLI:
    """Run the CLI; on bad input print ``error: <message>`` and exit 2 (``MOELORA_DEBUG=1``: traceback)."""
    argv = sys.argv[1:] if args is None else args
    code = _run_tool(list(argv)) if isinstance(argv, (list, tuple)) else None
    if code is not None:
        sys.exit(code)
    quiet_startup()
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")  # Lightning's own
    parser_kwargs: dict[str, Any] = {"exit_on_error": False, **{s: {"exit_on_error": False} for s in SUBCOMMANDS}}
    try:
        return MoELoRACLI(MoELoRAModule, ReasoningDataModule, save_config_kwargs={"overwrite": True},
                          parser_kwargs=parser_kwargs, args=args)  # fmt: skip
    except TrainingInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:
        if os.environ.get("MOELORA_DEBUG", "") not in ("", "0") or not is_user_error(err):
            raise
        print(f"error: {describe_error(err)}", file=sys.stderr)
        sys.exit(1 if isinstance(err, NonFiniteLossError) else 2)


if __name__ == "__main__":
    main()
