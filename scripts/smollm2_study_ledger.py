"""The committed ledger of the SmolLM2 study: what a finished run or evaluation leaves that the study needs again.

Run folders (adapters, checkpoints, TensorBoard events) live outside the repository and do not outlive the
machine. After every finished task :func:`archive` copies the small records of ``<out>`` into
``experiments/results/smollm2_commonsense_runs/`` (same relative paths); at start :func:`restore` copies them back
into a fresh ``<out>``. The driver then skips what is recorded: a training run's ``train_done.json`` (validation
losses, its adapter's path) decides the lr and reduction choices; an evaluation's ``test_results.json`` and
compact ``predictions.jsonl`` (per example correctness, no prompt text) feed the table. A chosen run whose adapter
is gone and that still lacks an evaluation is trained again (``Study.trained(..., need_adapter=True)``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

RECORDS = ("train_done.json", "test_results.json", "routing_probe.json", "run.json")
PREDICTION_TEXT = ("context", "continuations", "prompt", "instruction")  # long strings: not kept


def compact_predictions(source: Path, target: Path) -> None:
    """``predictions.jsonl`` without its prompt text (``PREDICTION_TEXT``)."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    target.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in PREDICTION_TEXT}) + "\n"
                              for r in rows))


def archive(out: Path, ledger: Path) -> int:
    """Copy the records of ``out`` that the ledger lacks or holds older (files written); commands of the
    evaluations (``test.log``'s ``$`` lines) go along as ``command.txt``."""
    written = 0
    for path in sorted(out.rglob("*")):
        if not path.is_file() or ".incomplete-" in str(path):
            continue
        target = ledger / path.relative_to(out)
        if path.name == "test.log":
            target = target.with_name("command.txt")
        elif path.name not in RECORDS + ("predictions.jsonl",):
            continue
        if target.is_file() and target.stat().st_mtime >= path.stat().st_mtime:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.name == "predictions.jsonl":
            compact_predictions(path, target)
        elif path.name == "test.log":
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.startswith("$ ")]
            target.write_text("\n".join(lines[-1:]) + "\n")
        else:
            shutil.copyfile(path, target)
        written += 1
    return written


def restore(ledger: Path, out: Path) -> int:
    """Copy the ledger's records into ``out`` where ``out`` has none (files written)."""
    written = 0
    for path in sorted(ledger.rglob("*")) if ledger.is_dir() else []:
        target = out / path.relative_to(ledger)
        if path.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            written += 1
    return written
