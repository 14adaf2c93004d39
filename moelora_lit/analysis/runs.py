"""The CPU ablation's grid: one ``python -m moelora_lit fit`` per (method, learning rate, seed) through the shared
runner (:mod:`moelora_lit.analysis.runner`), and its result rows.

Every run trains on the base config with the method's overrides, then tests on each task's **test** split and on
its **validation** split (datasets ``val_<task>``), so the learning-rate sweep is scored on validation without ever
looking at test. Its ``routing_probe.json`` (:class:`~moelora_lit.lightning.probe.RoutingProbe`) holds the
per-example routing summary at step 0 and after training.

Run layout: ``<out_dir>/<method>/lr<LR>/seed<S>/`` (``<out_dir>/<method>/seed<S>/`` for a run without a grid
learning rate) is one run's ``trainer.default_root_dir``; it holds the run's log (stdout and stderr), a JSON file
of the run (method, seed, command, exit code, wall time) and Lightning's ``lightning_logs/version_N/``
(``test_results.json``, ``routing_probe.json``, events, ``adapter/``). A run is finished when a
``test_results.json`` exists under its folder.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moelora_lit.analysis.logs import find_log_dir
from moelora_lit.analysis.runner import Job, run_jobs
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
PROBE = "--trainer.callbacks+=moelora_lit.lightning.probe.RoutingProbe"


def order(names: Sequence[str]) -> list[str]:
    """Methods in :data:`METHODS` order, unknown names after them in first-seen order."""
    names = list(dict.fromkeys(names))
    return [m for m in METHODS if m in names] + [m for m in names if m not in METHODS]


def run_dir(out_dir: str | os.PathLike, run: Run) -> Path:
    """``<out_dir>/<method>/lr<LR>/seed<S>`` (no ``lr<LR>`` level when ``run.lr`` is None): one run's
    ``trainer.default_root_dir``."""
    lr = [] if run.lr is None else [f"lr{run.lr:g}"]
    return Path(out_dir).joinpath(run.method, *lr, f"seed{run.seed}")


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


def run_grid(base_config: str | os.PathLike, out_dir: str | os.PathLike, runs: Sequence[Run],
             extra_args: Sequence[str] = (), jobs: int = 1, threads: int | None = None, isolate: bool = True,
             steps: int = -1, collect_only: bool = False) -> list[str]:
    """The ablation's runs through :func:`moelora_lit.analysis.runner.run_jobs`: each method's overrides on
    ``base_config`` plus the routing probe, logging to ``run.log`` and ``ablation_run.json``; a line per run with
    its mean accuracies. ``steps`` is recorded in the rows; the other arguments are :func:`run_jobs`'s."""
    out = Path(out_dir).resolve()
    width = max([len(r.method) for r in runs] + [1])

    def job(index: int, run: Run) -> Job:
        root = run_dir(out, run)
        cmd = command(str(base_config), root, run, [*method_overrides(run.method, base_config), PROBE], extra_args)
        lr = "" if run.lr is None else f" lr {run.lr:<8g}"
        accs = {}

        def summary() -> str | None:
            rows = run_rows(out, run)
            accs.update({s: [r["accuracy"] for r in rows if r["split"] == s] for s in ("validation", "test")})
            return "  ".join(f"mean {s} {np.mean(a):.3f}" for s, a in accs.items() if a) if rows else None

        meta = {"method": run.method, "seed": run.seed, "lr": run.lr, "alpha": method_alpha(run.method, base_config),
                "steps": steps}
        return Job(f"[{index + 1:>{len(str(len(runs)))}}/{len(runs)}] {run.method:<{width}}{lr} seed {run.seed}",
                   root, cmd, meta=meta, meta_name="ablation_run.json", summary=summary)

    return run_jobs([job(i, r) for i, r in enumerate(runs)], jobs=jobs, threads=threads, isolate=isolate,
                    collect_only=collect_only)


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
