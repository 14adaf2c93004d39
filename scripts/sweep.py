"""Run any set of experiment configs x seeds, one ``python -m moelora_lit fit`` per pair, skipping finished runs.

    python scripts/sweep.py --configs experiments/llama7b_math_moelora*.yaml experiments/llama7b_math_lora*.yaml \\
        --seeds 0 1 2 [--out runs/sweep] [--print] [-- extra CLI overrides, e.g. --model.base_model /models/llama]

Run ``<out>/<config stem>/seed<S>`` gets ``--seed_everything S --data.seed S --trainer.default_root_dir`` that folder
and a ``run.json`` (method = config stem, seed, command) that ``python -m moelora_lit report`` reads. A run is
finished when a ``test_results.json`` exists under its folder; an unfinished one with a ``last.ckpt`` resumes from
it. ``--print`` runs nothing and prints one self-contained command per unfinished run (this script for that single
pair), for a cluster's job array; each job skips itself if already done. The expert-count, top-k, rank and router
sweeps are config files (``experiments/llama7b_*_moelora_experts16.yaml`` ...): pass them with ``--configs``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve()


@dataclass
class Run:
    """One (config, seed) pair and where it logs."""

    config: Path
    seed: int
    folder: Path

    @property
    def method(self) -> str:
        return self.config.stem


def plan(configs: list[str], seeds: list[int], out: str) -> list[Run]:
    """Every config x seed, in that order; a missing config is an error."""
    missing = [c for c in configs if not Path(c).is_file()]
    if missing:
        raise FileNotFoundError(f"no such config file(s): {', '.join(missing)}")
    return [Run(Path(c), s, Path(out) / Path(c).stem / f"seed{s}") for c in configs for s in seeds]


def finished(run: Run) -> bool:
    return any(run.folder.rglob("test_results.json"))


def fit_command(run: Run, extra: list[str]) -> list[str]:
    """The ``fit`` command of one run (resuming from its ``last.ckpt`` when an earlier attempt left one)."""
    cmd = [sys.executable, "-m", "moelora_lit", "fit", "--config", str(run.config), "--seed_everything",
           str(run.seed), "--data.seed", str(run.seed), "--trainer.default_root_dir", str(run.folder)]
    last = sorted(run.folder.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    return cmd + (["--ckpt_path", str(last[-1])] if last else []) + extra


def job_command(run: Run, out: str, extra: list[str]) -> str:
    """A shell line that runs just this pair through this script (so it writes run.json and skips if done)."""
    args = ["python", str(SCRIPT), "--configs", str(run.config), "--seeds", str(run.seed), "--out", out]
    return shlex.join(args + (["--", *extra] if extra else []))


def execute(run: Run, extra: list[str]) -> int:
    """Write ``run.json`` and run ``fit`` (its output goes to ``<folder>/fit.log``); returns the exit code."""
    run.folder.mkdir(parents=True, exist_ok=True)
    cmd = fit_command(run, extra)
    meta = {"method": run.method, "seed": run.seed, "config": str(run.config), "command": shlex.join(cmd)}
    (run.folder / "run.json").write_text(json.dumps(meta, indent=2))
    with open(run.folder / "fit.log", "a") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True, help="experiment YAML files")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/sweep", help="runs go to <out>/<config stem>/seed<S>")
    parser.add_argument("--print", action="store_true", help="print one command per unfinished run; run nothing")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    try:
        runs = plan(args.configs, args.seeds, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    todo = [run for run in runs if not finished(run)]
    if args.print:
        for run in todo:
            print(job_command(run, args.out, extra))
        return 0
    print(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run", file=sys.stderr)
    failed = []
    for i, run in enumerate(todo, 1):
        start = time.perf_counter()
        code = execute(run, extra)
        status = "ok" if code == 0 and finished(run) else f"FAILED (exit {code}, see {run.folder / 'fit.log'})"
        print(f"[{i}/{len(todo)}] {run.method} seed {run.seed}: {status} in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        if status != "ok":
            failed.append(run)
    print(f"done; table: python -m moelora_lit report {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
