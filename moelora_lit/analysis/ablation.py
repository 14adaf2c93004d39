"""The CPU ablation (``experiments/studies/cpu_ablation``): a learning-rate sweep per method scored on
validation, then every method at its chosen rate for the same seeds, tested; results and per-run routing
summaries written where the notebooks read them.

Files written to ``results_dir`` (``experiments/studies/cpu_ablation/results`` by default):

- ``ablation_sweep.csv``: validation accuracy of every sweep run (method, lr, alpha, sweep seed, task);
- ``ablation_chosen.json``: the grid, each method's chosen lr (and alpha) with its mean validation accuracy,
  seeds, step budget and the command line;
- ``ablation_cpu.csv``: test accuracy, one row per method, seed and task (columns
  :data:`~moelora_lit.analysis.runs.COLUMNS`);
- ``ablation_routing/<method>_seed<S>.json``: each final run's ``routing_probe.json``.

The sweep runs at ``sweep_seed``; a final run with the same seed and rate is the same run and is not repeated.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from moelora_lit.analysis.logs import find_log_dir
from moelora_lit.analysis.runs import METHODS, Run, collect, method_alpha, order, run_dir, run_grid
from moelora_lit.analysis.study import LADDER, select_lr

RESULTS = Path("experiments") / "studies" / "cpu_ablation" / "results"  # relative to the repository root


def choose(sweep: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per method, the lr with the highest mean validation accuracy over tasks (ties: the smaller lr), by
    :func:`moelora_lit.analysis.study.select_lr`; ``extend_grid`` names the next lr to run when the choice lacks a
    worse neighbour on one side (``"beyond the ladder"`` when it sits at the end of :data:`LADDER`)."""
    val = sweep[sweep["split"] == "validation"]
    scores = val.groupby(["method", "lr"])["accuracy"].mean().reset_index()
    chosen = {}
    for method in order(list(scores["method"])):
        block = scores[scores["method"] == method].sort_values(["accuracy", "lr"], ascending=[False, True])
        grid = {float(lr): float(a) for lr, a in zip(block["lr"], block["accuracy"], strict=True)}
        best, extend, bracketed = select_lr(grid, higher_is_better=True, ladder=sorted({*LADDER, *grid}))
        chosen[method] = {"lr": best, "val_accuracy": round(grid[best], 4),
                          "grid": {f"{lr:g}": round(a, 4) for lr, a in grid.items()},
                          "extend_grid": None if bracketed else extend if extend is not None else "beyond the ladder"}
    return chosen


def run_ablation(
    base_config: str | os.PathLike,
    out_dir: str | os.PathLike,
    lrs: Sequence[float] | Mapping[str, Sequence[float]],
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    sweep_seed: int = 0,
    extra_args: Sequence[str] = (),
    sweep_args: Sequence[str] = (),
    final_args: Sequence[str] = (),
    results_dir: str | os.PathLike = RESULTS,
    jobs: int = 1,
    threads: int | None = None,
    isolate: bool = True,
    steps: int = -1,
    collect_only: bool = False,
) -> pd.DataFrame:
    """Sweep, choose, run the seeds and write the files listed in the module docstring.

    Args:
        base_config: the YAML every method starts from (e.g. ``experiments/quickstart.yaml``).
        out_dir: runs go to ``<out_dir>/<method>/lr<LR>/seed<S>``.
        lrs: the learning-rate grid, shared or per method.
        methods: names from :data:`METHODS` (default: all).
        seeds: seeds of the final runs (every method runs all of them).
        sweep_seed: the seed of the sweep runs.
        extra_args: CLI overrides for every run (e.g. ``["--trainer.max_steps=50"]``).
        sweep_args, final_args: more overrides for the sweep runs (e.g. test and validation sets) and for the
            other final runs (e.g. test sets only); a final run that is also a sweep run is not run again.
        results_dir: where the CSVs, the chosen values and the routing summaries go.
        jobs, threads, isolate: see :func:`moelora_lit.analysis.runs.run_grid`.
        steps: the step budget, recorded in the rows.
        collect_only: train nothing; write the files from the runs that finished (e.g. of an ablation cut short).

    Returns:
        The test rows of the final runs.

    Raises:
        RuntimeError: after writing what finished, if any run failed.
    """
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    grid = {m: list(lrs[m] if isinstance(lrs, Mapping) else lrs) for m in methods}
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    kwargs = dict(jobs=jobs, threads=threads, isolate=isolate, steps=steps, collect_only=collect_only)

    sweep_runs = [Run(m, float(lr), sweep_seed) for m in methods for lr in grid[m]]
    failures = run_grid(base_config, out_dir, sweep_runs, extra_args=[*extra_args, *sweep_args], **kwargs)
    sweep = collect(out_dir, sweep_runs)
    sweep[sweep["split"] == "validation"].to_csv(results / "ablation_sweep.csv", index=False)
    chosen = choose(sweep)
    for method in chosen:
        chosen[method]["alpha"] = method_alpha(method, base_config)
    meta = {"base_config": str(base_config), "steps": steps, "seeds": list(seeds), "sweep_seed": sweep_seed,
            "lr_grid": {m: [float(x) for x in g] for m, g in grid.items()}, "extra_args": list(extra_args),
            "sweep_args": list(sweep_args), "final_args": list(final_args),
            "chosen": chosen, "selection": "mean validation accuracy over tasks, sweep seed only; ties: smaller lr"}
    (results / "ablation_chosen.json").write_text(json.dumps(meta, indent=1) + "\n")

    final_runs = [Run(m, chosen[m]["lr"], s) for s in seeds for m in methods if m in chosen]  # seed by seed
    failures += run_grid(base_config, out_dir, final_runs, extra_args=[*extra_args, *final_args], **kwargs)
    final = collect(out_dir, final_runs)
    test = final[final["split"] == "test"].reset_index(drop=True)
    test.to_csv(results / "ablation_cpu.csv", index=False)
    copy_routing(out_dir, final_runs, results / "ablation_routing")
    if failures:
        raise RuntimeError(f"{len(failures)} runs failed ({results} holds the others):\n  " + "\n  ".join(failures))
    return test


def copy_routing(out_dir: str | os.PathLike, runs: Sequence[Run], dest: str | os.PathLike) -> int:
    """Copy each run's ``routing_probe.json`` to ``<dest>/<method>_seed<S>.json``; the number copied."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = 0
    for run in runs:
        log_dir = find_log_dir(run_dir(Path(out_dir).resolve(), run), "routing_probe.json")
        if log_dir is not None:
            shutil.copyfile(log_dir / "routing_probe.json", dest / f"{run.method}_seed{run.seed}.json")
            copied += 1
    return copied
