"""``MoELoRACLI``: LightningCLI with the project's links, callbacks, pre-flight checks and test-after-fit."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar as ProgressBarBase
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from moelora_lit.data.resumable import resumable_train_dataloader
from moelora_lit.lightning.checks import (
    TrainingInterrupted,
    check_checkpoint,
    check_optimizer,
    check_output_dirs,
)
from moelora_lit.lightning.fault_tolerance import FaultTolerance
from moelora_lit.lightning.figures import ProgressBar
from moelora_lit.lightning.routing import RoutingStatsCallback
from moelora_lit.lightning.sharding import prepare_strategy
from moelora_lit.models.gguf import tokenizer_reference

SUBCOMMANDS = ("fit", "validate", "test", "predict")
# model.* settings that say where and how to run, not what was trained: on --ckpt_path the command line keeps
# them (LightningCLI otherwise replaces every model.* value with the checkpoint's hyper-parameters, so a base
# model moved to another folder or machine could not be resumed).
RUNTIME_KEYS = ("base_model", "init_adapter", "torch_dtype", "trust_remote_code", "gradient_checkpointing",
                "max_new_tokens", "generate_on_validation", "answer_protocol", "num_beams", "gguf_file", "quantization",
                "scoring", "loglik_prompt", "loglik_batch_sequences")
# Dataset lists that a command-line value replaces whole (see replace_whole_lists).
WHOLE_LISTS = ("data.train", "data.val", "data.test")


def replace_whole_lists(args: Sequence[str]) -> list[str]:
    """``args`` with ``--data.<split>=null`` before every ``--data.<split>=[...]`` / ``--data.<split> [...]``.

    jsonargparse merges a list given on the command line item by item into an earlier list of the same length, so
    ``--data.test=[{name: arc_c, path: P}]`` after a config whose one test entry has ``limit: 300`` would keep that
    limit. Resetting the key first makes the command line's entries replace the config's whole: a field left out
    takes its :class:`~moelora_lit.data.specs.DatasetSpec` default. ``--data.<split>+=...`` still appends.
    """
    out: list[str] = []
    for arg in args:
        key = arg.split("=", 1)[0] if isinstance(arg, str) else None
        if key is not None and key.startswith("--") and key[2:] in WHOLE_LISTS:
            out.append(f"{key}=null")
        out.append(arg)
    return out


class MoELoRACLI(LightningCLI):
    """LightningCLI with the tokenizer linked to the base model, routing statistics and fault tolerance
    (``faults``) always on, pre-flight checks before anything heavy runs, ``--ckpt_path`` refused when it holds
    pickled objects and loaded with ``weights_only=True``, a mid-epoch-resumable train loader, and ``fit``
    followed by ``test`` when the data has test sets (``--test_after_fit=false`` to skip). A ``--data.train``,
    ``--data.val`` or ``--data.test`` list on the command line replaces the config's list whole
    (:func:`replace_whole_lists`)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(("model.base_model", "model.gguf_file"), "data.tokenizer", compute_fn=tokenizer_reference)
        parser.add_lightning_class_args(RoutingStatsCallback, "routing")
        parser.add_lightning_class_args(FaultTolerance, "faults")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, evaluate on data.test and write test_results.json.")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        """Lightning's TQDM bar on one line (loss terms, it/s) unless the config turns the bar off or brings one."""
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBarBase) for c in [*given, *callbacks]
        ):
            callbacks = [*callbacks, ProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            parser.set_defaults(weights_only=True)  # Lightning's default (None) means False
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if isinstance(args, (list, tuple)):  # a dict or Namespace has no command-line order
            args = replace_whole_lists(args)
        if args is None:  # the command line itself, rewritten in place (Lightning warns when given both)
            saved = sys.argv
            sys.argv = [saved[0], *replace_whole_lists(saved[1:])]
            try:
                super().parse_arguments(parser, None)
            finally:
                sys.argv = saved
        else:
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:  # LightningCLI reads the checkpoint's hyper-parameters next (weights_only=True): check first
            check_checkpoint(self.config[subcommand].get("ckpt_path"))

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        given = self.config[subcommand].get("model") if subcommand else None
        kept = {f"model.{key}": given[key] for key in RUNTIME_KEYS if given is not None and key in given}
        if subcommand and self.config[subcommand].get("data.tokenizer") is not None:
            kept["data.tokenizer"] = self.config[subcommand]["data.tokenizer"]  # linked from model.base_model
        super()._parse_ckpt_path()
        for key, value in kept.items():
            self.config[subcommand][key] = value

    def after_instantiate_classes(self) -> None:
        if self.subcommand is not None:
            check_output_dirs(self.trainer)  # before any weights load or data is tokenised
            prepare_strategy(self.trainer)  # ModelParallelStrategy's "auto" sizes -> FSDP2 data parallelism
            check_optimizer(self.model)

    def before_fit(self) -> None:
        if self.datamodule is not None:
            resumable_train_dataloader(self.datamodule)

    def fit(self, model: Any, **kwargs: Any) -> None:
        try:
            self.trainer.fit(model, **kwargs)
        except SystemExit:  # Lightning's KeyboardInterrupt handling exits with 1
            self._raise_if_interrupted()
            raise
        self._raise_if_interrupted()  # the signal came during the last step: fit ended normally

    def _raise_if_interrupted(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, FaultTolerance) and callback.signum is not None and callback.saved_path:
                raise TrainingInterrupted(callback.interrupt_message(), callback.signum, callback.saved_path)

    def after_fit(self) -> None:
        config = self.config.get(self.subcommand, {})
        if config.get("test_after_fit", True) and getattr(self.datamodule, "test_names", None):
            best = best_checkpoint(self.trainer)  # with a monitored ModelCheckpoint: its best, as LLM-Adapters
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False, ckpt_path=best,
                              weights_only=True if best else None)


def best_checkpoint(trainer: Any) -> str | None:
    """The best checkpoint of the first ``ModelCheckpoint`` that monitors a metric, if it has written one."""
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "best_model_path", "")
        if getattr(callback, "monitor", None) and path and os.path.isfile(path):
            return path
    return None
