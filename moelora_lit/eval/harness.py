"""lm-evaluation-harness tasks for LLM-Adapters-format files: the shipped offline task YAMLs
(:mod:`moelora_lit.eval.harness_tasks`), ``--data TASK=PATH`` entries and the per-run task folder.

The ``python -m moelora_lit lm-eval`` command that runs them on a built model is
:mod:`moelora_lit.lightning.harness_run`.
"""

from __future__ import annotations

import json
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "harness_tasks"


def shipped_tasks() -> dict[str, Path]:
    """Task name -> YAML of the shipped offline tasks (``moelora_arc_easy``, ...)."""
    return {p.stem: p for p in sorted(TASKS_DIR.glob("moelora_*.yaml"))}


def data_files(data: list[str]) -> dict[str, str]:
    """``--data TASK=PATH`` entries as task -> absolute path; ValueError / FileNotFoundError naming a bad entry."""
    shipped, files = shipped_tasks(), {}
    for entry in data:
        task, sep, path = entry.partition("=")
        if not sep or task not in shipped:
            raise ValueError(f"--data {entry!r}: write TASK=PATH with TASK one of {', '.join(shipped)}")
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"--data {entry!r}: {path} does not exist")
        files[task] = str(Path(path).expanduser().resolve())
    return files


def write_task_yamls(folder: Path, files: dict[str, str]) -> None:
    """One YAML per shipped task in ``folder``: ``include:`` the shipped one, ``data_files`` set from ``files``."""
    folder.mkdir(parents=True, exist_ok=True)
    for task, yaml_path in shipped_tasks().items():
        lines = [f"include: {yaml_path}"]
        if task in files:
            lines += ["dataset_kwargs:", "  data_files:", f"    test: {json.dumps(files[task])}"]
        (folder / f"{task}.yaml").write_text("\n".join(lines) + "\n")
