"""Run the MoELoRA ablation: an lr sweep per method on validation, then all methods x seeds at the chosen rates.

    python experiments/studies/cpu_ablation/driver.py [--config experiments/quickstart.yaml] [--out runs/ablation]
        [--methods lora lora_scaled moelora moelora_no_contrastive moelora_random_router]
        [--lrs 1e-3 3e-3 1e-2] [--lr-grid METHOD=LR,LR ...] [--seeds 0 1 2 3 4] [--sweep-seed 0]
        [--max-steps N] [--jobs 2] [--threads 1] [--results experiments/studies/cpu_ablation/results]
        [--collect-only]
        [-- extra CLI overrides]

Every run is one ``python -m moelora_lit fit`` in ``<out>/<method>/lr<LR>/seed<S>`` (resumable: finished runs are
skipped). Sweep runs are tested on each task's test and validation split (``val_<task>``), the other final runs
on test only. The sweep picks each
method's lr by mean validation accuracy (never test). ``--max-steps`` also sets the cosine schedule's ``T_max``.
Writes ``ablation_sweep.csv``, ``ablation_chosen.json``, ``ablation_cpu.csv`` and ``ablation_routing/`` under
``--results``, prints the test table (mean [95% t interval] over seeds, in %), the paired differences to
MoELoRA and the total wall time. Then re-execute the notebooks: ``python scripts/execute_notebooks.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import pandas as pd  # noqa: E402

from moelora_lit.analysis import METHODS, eval_datasets, interval_table, paired_table, run_ablation, wide  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/quickstart.yaml", help="base config every method starts from")
    parser.add_argument("--out", default="runs/ablation", help="runs go to <out>/<method>/lr<LR>/seed<S>")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="lr grid for every method")
    parser.add_argument("--lr-grid", nargs="*", default=[], metavar="METHOD=LR,LR",
                        help="a method's own grid, e.g. lora=3e-3,1e-2,3e-2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--sweep-seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="trainer.max_steps and the cosine T_max")
    parser.add_argument("--eval-limit", type=int, default=50, help="test and validation rows per task")
    parser.add_argument("--results", default="experiments/studies/cpu_ablation/results",
                        help="where the CSVs and summaries go")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--collect-only", action="store_true",
                        help="train nothing: write the results files from the runs that finished")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    steps = -1
    if args.max_steps is not None:
        steps = args.max_steps
        extra += [f"--trainer.max_steps={steps}", f"--model.lr_scheduler.init_args.T_max={steps}"]
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    grid = {m: list(args.lrs) for m in args.methods}
    for item in args.lr_grid:
        method, _, values = item.partition("=")
        if method not in grid:
            parser.error(f"--lr-grid {item}: {method!r} is not among --methods")
        grid[method] = [float(v) for v in values.split(",")]

    start = time.perf_counter()
    runs = len({(m, lr) for m, g in grid.items() for lr in g}) + len(args.methods) * (len(args.seeds) - 1)
    print(f"ablation: {len(args.methods)} methods, lr grid {grid}, seeds {args.seeds} (sweep seed {args.sweep_seed}),"
          f" at most {runs} runs, from {args.config} -> {args.out}", flush=True)
    try:
        sweep_args = [f"--data.test={eval_datasets(limit=args.eval_limit)}"]
        final_args = [f"--data.test={eval_datasets(limit=args.eval_limit, splits=('test',))}"]
        df = run_ablation(args.config, args.out, grid, methods=args.methods, seeds=args.seeds,
                          sweep_args=sweep_args, final_args=final_args,
                          sweep_seed=args.sweep_seed, extra_args=extra, results_dir=args.results, jobs=args.jobs,
                          threads=args.threads, steps=steps, collect_only=args.collect_only)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 50)
    print("\ntest accuracy (%), mean [95% t interval] over seeds:")
    print(wide(interval_table(df)).to_string())
    if "moelora" in set(df["method"]) and df["method"].nunique() > 1:     # nothing to pair with MoELoRA alone
        print("\npaired difference to moelora (points) [95% t interval], paired t-test p:")
        print(wide(paired_table(df)).to_string())
    print(f"\nresults in {args.results}; total wall time {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
