"""Run any set of experiment configs x seeds, one ``python -m moelora_lit fit`` per pair, skipping finished runs
(a command line over :mod:`moelora_lit.analysis.runner`, the runner the studies use).

    python scripts/sweep.py --configs experiments/llama7b_math_moelora*.yaml experiments/llama7b_math_lora*.yaml \\
        --seeds 0 1 2 [--out runs/sweep] [--jobs 2 --threads 1] [--print] [-- extra CLI overrides]

Run ``<out>/<config stem>/seed<S>`` gets ``--seed_everything S --data.seed S --trainer.default_root_dir`` that folder
and a ``run.json`` (method = config stem, seed, command) that ``python -m moelora_lit report`` reads. A run is
finished when a ``test_results.json`` exists under its folder; an unfinished one with a ``last.ckpt`` resumes from
it. ``--print`` runs nothing and prints one self-contained command per unfinished run (this script for that single
pair), for a cluster's job array; each job skips itself if already done. The expert-count, top-k, rank and router
sweeps are config files (``experiments/llama7b_*_moelora_experts16.yaml`` ...): pass them with ``--configs``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moelora_lit.analysis import runner  # noqa: E402
from moelora_lit.analysis.logs import find_log_dir  # noqa: E402
from moelora_lit.analysis.runs import run_dir  # noqa: E402
from moelora_lit.eval.report import Run  # noqa: E402

SCRIPT = Path(__file__).resolve()


def plan(configs: list[str], seeds: list[int]) -> list[Run]:
    """Every config x seed, in that order (method = the config's file stem); a missing config is an error."""
    missing = [c for c in configs if not Path(c).is_file()]
    if missing:
        raise FileNotFoundError(f"no such config file(s): {', '.join(missing)}")
    return [Run(Path(c).stem, None, s, Path(c)) for c in configs for s in seeds]


def fit_command(run: Run, folder: Path, extra: list[str]) -> list[str]:
    """The ``fit`` command of one run (resuming from its ``last.ckpt`` when an earlier attempt left one)."""
    return runner.fit_command([run.config], folder, run.seed, extra)


def job_command(run: Run, out: str, extra: list[str]) -> str:
    """A shell line that runs just this pair through this script (so it writes run.json and skips if done)."""
    args = ["python", str(SCRIPT), "--configs", str(run.config), "--seeds", str(run.seed), "--out", out]
    return shlex.join(args + (["--", *extra] if extra else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True, help="experiment YAML files")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/sweep", help="runs go to <out>/<config stem>/seed<S>")
    parser.add_argument("--print", action="store_true", help="print one command per unfinished run; run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    try:
        runs = plan(args.configs, args.seeds)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    todo = [run for run in runs if find_log_dir(run_dir(args.out, run)) is None]
    if args.print:
        for run in todo:
            print(job_command(run, args.out, extra))
        return 0
    print(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run", file=sys.stderr)
    jobs = []
    for run in todo:
        folder = run_dir(Path(args.out).resolve(), run)
        jobs.append(runner.Job(f"{run.method} seed {run.seed}", folder, fit_command(run, folder, extra),
                               log_name="fit.log", meta={"method": run.method, "seed": run.seed,
                                                         "config": str(run.config)}))
    failed = runner.run_jobs(jobs, jobs=args.jobs, threads=args.threads, stream=sys.stderr)
    print(f"done; table: python -m moelora_lit report {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
