"""Running grids of training runs, one ``python -m moelora_lit fit`` each, skipping finished ones (:func:`run_all`,
also behind ``scripts/sweep.py``), and the ablation grid: one run per (method, learning rate, seed), and its rows.

Every run trains on the base config with the method's overrides, then tests on each task's **test** split and on
its **validation** split (datasets ``val_<task>``), so the learning-rate sweep is scored on validation without ever
looking at test. Its ``routing_probe.json`` (:class:`~moelora_lit.analysis.probe.RoutingProbe`) holds the
per-example routing summary at step 0 and after training.

Run layout: ``<out_dir>/<method>/lr<LR>/seed<S>/`` (``<out_dir>/<method>/seed<S>/`` for a run without a grid
learning rate) is one run's ``trainer.default_root_dir``; it holds the run's log (stdout and stderr), a JSON file
of the run (method, seed, command, exit code, wall time) and Lightning's ``lightning_logs/version_N/``
(``test_results.json``, ``routing_probe.json``, events, ``adapter/``). A run is finished when a
``test_results.json`` exists under its folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from moelora_lit.data.synthetic import SYNTHETIC_TASKS, effective_n
from moelora_lit.eval.report import Run

_LORA = ["--model.adapter.num_experts=1", "--model.adapter.top_k=1", "--model.adapter.contrastive_weight=0",
         "--model.adapter.balance_weight=0", "--model.adapter.z_loss_weight=0"]
# Method name -> command-line overrides on top of the base config. All keep the base config's rank r, so all have
# the same LoRA parameters (r x (in + out) per layer); MoELoRA adds N x in router weights per layer, `lora` keeps an
# inert 1 x in router (softmax over one logit is 1: no gradient), the random router has none. Scaling: MoELoRA
# multiplies its update by alpha / s (s = r / N), LoRA by alpha / r, N times less; `lora_scaled` is LoRA with
# alpha x N, MoELoRA's scale ({alpha_x_n} is filled in from the base config).
METHODS: dict[str, list[str]] = {
    "lora": _LORA,
    "lora_scaled": [*_LORA, "--model.adapter.lora_alpha={alpha_x_n}"],
    "moelora": [],
    "moelora_no_contrastive": ["--model.adapter.contrastive_weight=0"],
    "moelora_random_router": ["--model.adapter.router=random", "--model.adapter.balance_weight=0"],
}
COLUMNS = ["method", "seed", "lr", "alpha", "split", "task", "accuracy", "n", "effective_n", "steps", "wall_s",
           "trainable_params"]
VAL_PREFIX = "val_"
PROBE = "--trainer.callbacks+=moelora_lit.analysis.probe.RoutingProbe"


def order(names: Sequence[str]) -> list[str]:
    """Methods in :data:`METHODS` order, unknown names after them in first-seen order."""
    names = list(dict.fromkeys(names))
    return [m for m in METHODS if m in names] + [m for m in names if m not in METHODS]


def run_dir(out_dir: str | os.PathLike, run: Run) -> Path:
    """``<out_dir>/<method>/lr<LR>/seed<S>`` (no ``lr<LR>`` level when ``run.lr`` is None): one run's
    ``trainer.default_root_dir``."""
    lr = [] if run.lr is None else [f"lr{run.lr:g}"]
    return Path(out_dir).joinpath(run.method, *lr, f"seed{run.seed}")


def find_log_dir(root: str | os.PathLike, name: str = "test_results.json") -> Path | None:
    """The newest folder under ``root`` (itself included) holding a file ``name``; None if there is none."""
    found = [p.parent for p in Path(root).rglob(name)] if Path(root).is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def count_adapter_params(adapter_dir: str | os.PathLike) -> int:
    """Number of adapter parameters in ``<adapter_dir>/adapter.safetensors`` (read from its header: no torch)."""
    with open(Path(adapter_dir) / "adapter.safetensors", "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return int(sum(np.prod(v["shape"], dtype=np.int64) for k, v in header.items() if k != "__metadata__"))


def base_adapter(base_config: str | os.PathLike) -> dict[str, Any]:
    """``model.adapter`` of a YAML config (``lora_alpha`` and ``num_experts`` default to MoELoRAConfig's)."""
    import yaml

    from moelora_lit.config import MoELoRAConfig

    given = (yaml.safe_load(Path(base_config).read_text()).get("model") or {}).get("adapter") or {}
    return {"lora_alpha": MoELoRAConfig.lora_alpha, "num_experts": MoELoRAConfig.num_experts} | given


def method_overrides(method: str, base_config: str | os.PathLike) -> list[str]:
    """The CLI overrides of ``method`` with its placeholders filled in from ``base_config``."""
    adapter = base_adapter(base_config)
    alpha_x_n = adapter["lora_alpha"] * adapter["num_experts"]
    return [o.format(alpha_x_n=alpha_x_n) for o in METHODS[method]]


def method_alpha(method: str, base_config: str | os.PathLike) -> float:
    """The ``lora_alpha`` a method trains with."""
    key = "--model.adapter.lora_alpha="
    alpha = [o[len(key):] for o in method_overrides(method, base_config) if o.startswith(key)]
    return float(alpha[-1]) if alpha else float(base_adapter(base_config)["lora_alpha"])


def eval_datasets(tasks: Sequence[str] = SYNTHETIC_TASKS, limit: int = 50,
                  splits: Sequence[str] = ("test", "validation")) -> str:
    """``--data.test`` value: each task's test split, then (if asked) its validation split as ``val_<task>``."""
    specs = [f"{{name: {t}, limit: {limit}}}" for t in tasks] if "test" in splits else []
    if "validation" in splits:
        specs += [f"{{name: {t}, split: validation, limit: {limit}, alias: {VAL_PREFIX}{t}}}" for t in tasks]
    return "[" + ", ".join(specs) + "]"


def command(base_config: str, root: Path, run: Run, overrides: Sequence[str], extra_args: Sequence[str]) -> list[str]:
    """The run's command line. Later arguments win in jsonargparse: the method's overrides beat ``extra_args``,
    the run's learning rate, seed and folder beat both."""
    return [sys.executable, "-m", "moelora_lit", "fit", "--config", str(base_config), *extra_args, *overrides,
            f"--model.optimizer.init_args.lr={run.lr:g}", f"--seed_everything={run.seed}",
            f"--trainer.default_root_dir={root}", "--test_after_fit=true"]


def run_rows(out_dir: Path, run: Run, alpha: float = float("nan")) -> list[dict[str, Any]]:
    """CSV rows of one finished run (empty if it has no ``test_results.json``)."""
    root = run_dir(out_dir, run)
    log_dir = find_log_dir(root)
    if log_dir is None:
        return []
    results = json.loads((log_dir / "test_results.json").read_text())
    meta_path = root / "ablation_run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    adapter = log_dir / "adapter"
    params = count_adapter_params(adapter) if (adapter / "adapter.safetensors").is_file() else -1
    rows = []
    for name, r in results.items():
        split, task = ("validation", name[len(VAL_PREFIX):]) if name.startswith(VAL_PREFIX) else ("test", name)
        n = int(r["n"])
        eff = effective_n(task, split, n) if task in SYNTHETIC_TASKS else n
        rows.append({"method": run.method, "seed": run.seed, "lr": run.lr, "alpha": meta.get("alpha", alpha),
                     "split": split, "task": task, "accuracy": float(r["accuracy"]), "n": n, "effective_n": eff,
                     "steps": meta.get("steps", -1), "wall_s": round(float(meta.get("wall_s", float("nan"))), 2),
                     "trainable_params": params})
    return rows


def _run_in_process(args: list[str], log: Any) -> int:
    """``python -m moelora_lit <args>`` inside this process, its prints going to ``log``; the exit code."""
    from moelora_lit.__main__ import main

    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            main(args=args)
        except SystemExit as err:
            return err.code if isinstance(err.code, int) else 1
        except Exception:
            traceback.print_exc(file=log)
            return 1
    return 0


def run_grid(base_config: str | os.PathLike, out_dir: str | os.PathLike, runs: Sequence[Run],
             extra_args: Sequence[str] = (), jobs: int = 1, threads: int | None = None, isolate: bool = True,
             steps: int = -1, collect_only: bool = False) -> list[str]:
    """The ablation's runs through :func:`run_all`: each method's overrides on ``base_config`` plus the routing probe,
    logging to ``run.log`` and ``ablation_run.json``; a line per run with its mean accuracies. ``steps`` is recorded
    in the rows; the other arguments are :func:`run_all`'s."""
    out = Path(out_dir).resolve()

    def build(run: Run, root: Path) -> list[str]:
        return command(str(base_config), root, run, [*method_overrides(run.method, base_config), PROBE], extra_args)

    def meta(run: Run, cmd: list[str]) -> dict[str, Any]:
        return {"method": run.method, "seed": run.seed, "lr": run.lr, "alpha": method_alpha(run.method, base_config),
                "steps": steps, "command": cmd}

    def summary(run: Run) -> str | None:
        rows = run_rows(out, run)
        accs = {s: [r["accuracy"] for r in rows if r["split"] == s] for s in ("validation", "test")}
        return "  ".join(f"mean {s} {np.mean(a):.3f}" for s, a in accs.items() if a) if rows else None

    return run_all(runs, out, build, meta, log_name="run.log", meta_name="ablation_run.json", summary=summary,
                   jobs=jobs, threads=threads, isolate=isolate, collect_only=collect_only)


def run_all(runs: Sequence[Run], out_dir: str | os.PathLike, build: Callable[[Run, Path], list[str]],
            meta: Callable[[Run, list[str]], dict[str, Any]], log_name: str = "run.log",
            meta_name: str = "run.json", summary: Callable[[Run], str | None] | None = None, jobs: int = 1,
            threads: int | None = None, isolate: bool = True, collect_only: bool = False,
            stream: TextIO | None = None) -> list[str]:
    """Run every unfinished run's command in its folder (:func:`run_dir`), ``jobs`` at a time; one line per run.

    Resumable: a run with a ``test_results.json`` is skipped; a failed one runs again. Each run's folder gets
    ``meta_name`` (``meta(run, command)`` before the run, plus its exit code and wall time after) and its output
    in ``log_name``.

    Args:
        build: the command of a run, given the run and its folder (``python -m moelora_lit fit ...``).
        summary: what to print for a run that exited 0, or None if it left no results (a failure); default: "ok".
        threads: ``OMP_NUM_THREADS`` of each run.
        isolate: False runs them one after another in this process (for tests: ``jobs`` and ``threads`` are then
            ignored; the command must start with ``python -m moelora_lit``).
        collect_only: train nothing; report the unfinished runs as failures.
        stream: where the lines go (default: stdout).

    Returns:
        The failures (empty when all finished).
    """
    out = Path(out_dir).resolve()
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])  # runs find moelora_lit even when not installed
    env["PYTHONPATH"] = os.pathsep.join([package_parent, *filter(None, [env.get("PYTHONPATH")])])
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    width = max([len(r.method) for r in runs] + [1])

    def say(text: str) -> None:
        print(text, file=stream or sys.stdout, flush=True)

    def one(index: int, run: Run) -> str | None:
        lr = "" if run.lr is None else f" lr {run.lr:<8g}"
        label = f"[{index + 1:>{len(str(len(runs)))}}/{len(runs)}] {run.method:<{width}}{lr} seed {run.seed}"
        name = f"{run.method}{'' if run.lr is None else f' lr {run.lr:g}'} seed {run.seed}"
        root = run_dir(out, run)
        if find_log_dir(root) is not None:
            say(f"{label}  skipped (test_results.json exists)")
            return None
        if collect_only:
            say(f"{label}  not finished (collect only)")
            return f"{name}: not finished"
        root.mkdir(parents=True, exist_ok=True)
        cmd = build(run, root)
        info = meta(run, cmd)
        (root / meta_name).write_text(json.dumps(info, indent=1))
        start = time.perf_counter()
        with open(root / log_name, "a") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            if isolate:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            else:
                code = _run_in_process(cmd[3:], log)
        wall = time.perf_counter() - start
        (root / meta_name).write_text(json.dumps(info | {"returncode": code, "wall_s": wall}, indent=1))
        done = find_log_dir(root) is not None
        scores = (summary(run) if summary is not None else "ok") if done else None
        if code != 0 or scores is None:
            tail = "".join((root / log_name).read_text().splitlines(keepends=True)[-15:])
            say(f"{label}  FAILED (exit {code}) after {wall:.1f} s; last lines of {root / log_name}:\n{tail}")
            return f"{name}: exit {code}, see {root / log_name}"
        say(f"{label}  {wall:7.1f} s  {scores}")
        return None

    with ThreadPoolExecutor(max_workers=max(1, jobs) if isolate else 1) as pool:
        return [f for f in pool.map(lambda a: one(*a), list(enumerate(runs))) if f]


def collect(out_dir: str | os.PathLike, runs: Sequence[Run]) -> pd.DataFrame:
    """The rows (:data:`COLUMNS`) of every run that finished."""
    out = Path(out_dir).resolve()
    return pd.DataFrame([row for run in dict.fromkeys(runs) for row in run_rows(out, run)], columns=COLUMNS)


def load_results(csv: str | os.PathLike) -> pd.DataFrame:
    """A CSV written by :func:`moelora_lit.analysis.ablation.run_ablation`."""
    df = pd.read_csv(csv)
    missing = sorted({"method", "seed", "task", "accuracy", "n", "lr"} - set(df.columns))
    if missing:
        raise ValueError(f"{csv}: missing column(s) {missing}")
    return df
