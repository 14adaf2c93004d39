"""The SmolLM2-135M common-sense study: LoRA vs MoELoRA vs MoELoRA without the contrastive loss, resumable.

    python scripts/smollm2_study.py train    [--jobs 1] [--out /work/runs/smollm2_commonsense]
    python scripts/smollm2_study.py evaluate [--jobs 1]
    python scripts/smollm2_study.py all      [--jobs 1] [--prefer evaluate]   # both, training first by default
    python scripts/smollm2_study.py status                      # what is done, chosen, left
    python scripts/smollm2_study.py table                       # experiments/results/smollm2_commonsense.{csv,json}
                                                                # (from the committed records alone on a fresh machine)

Configs: ``experiments/smollm2_commonsense_{lora,moelora,moelora_no_contrastive}.yaml`` (data, sizing, why).
Every training run goes through ``scripts/sweep.py`` (one config x one seed, a resumable ``fit`` logging to its
``fit.log``) into ``<out>/train/<variant>/lr<LR>/<config stem>/seed<S>``; variants are ``lora``,
``moelora-sum``, ``moelora-mean`` and ``moelora_no_contrastive-<reduction>``.

1. **train**. Per variant an lr grid at seed 0 over :data:`INITIAL_LRS`, extended along :data:`LADDER` until the
   lr with the lowest validation loss (response loss on each held-out slice, averaged over the three, after the
   one epoch; ties
   go to the lower lr) has a worse neighbour on both sides. MoELoRA runs the grid with ``aux_reduction`` ``sum``
   and ``mean`` and keeps the one with the lower best validation loss; MoELoRA without the contrastive loss then
   uses that reduction (the pair differs in the contrastive term only). Then seeds 1.. at each method's choice.
2. **evaluate**. Each chosen run (every seed) and the untrained base (``zero_shot``: the LoRA config's injected
   adapter, B = 0) is tested on ``data.test`` once per scoring in :data:`SCORINGS` into ``<run>/eval/<scoring>``.
   Log-likelihood scorings run only once the CLI has ``model.scoring`` (else they wait).
3. **table**. One CSV row per method, seed, dataset and scoring; a JSON with intervals, paired differences and
   the routing summaries; the commands.

A run is trained when a ``lightning_logs/version_N`` of it holds ``adapter/`` and a ``val/loss`` (validation runs
at the end of the epoch only); an evaluation is done when its folder holds ``test_results.json``. Anything else
reruns, resuming from ``last.ckpt`` (saved every 20 steps and on SIGTERM). A lock file per run folder lets several
copies of this script (``--jobs`` each) share the work.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smollm2_study_ledger import archive, restore

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scripts" / "sweep.py"
METHOD_NAMES = ("lora", "moelora", "moelora_no_contrastive")
CONFIGS = {m: ROOT / "experiments" / f"smollm2_commonsense_{m}.yaml" for m in METHOD_NAMES}
METHODS = list(CONFIGS)
INITIAL_LRS = (3e-4, 1e-3, 3e-3)
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
REDUCTIONS = ("sum", "mean")
SEEDS = (0, 1, 2)
# (folder name, scoring, prompt, for the zero-shot base only)
SCORINGS = [("loglikelihood-training", "loglikelihood", "training", False),
            ("loglikelihood-harness", "loglikelihood", "harness", True), ("generate", "generate", "training", False)]
RESULTS = ROOT / "experiments" / "results"
LEDGER = RESULTS / "smollm2_commonsense_runs"  # committed records of finished runs (smollm2_study_ledger.py)
GENERATE_LIMIT = 200  # rows per test set scored by generation (up to 40 new tokens: the costliest scoring)


@dataclass(frozen=True)
class Task:
    """One unit of work: a training run (``scoring`` None) or one evaluation."""

    method: str
    variant: str
    lr: float | None
    seed: int | None
    folder: Path
    scoring: tuple[str, str, str, bool] | None = None
    adapter: str | None = None

    @property
    def label(self) -> str:
        what = f"eval {self.scoring[0]}" if self.scoring else "train"
        return f"{what} {self.variant} lr {self.lr:g} seed {self.seed}" if self.lr else f"{what} {self.variant}"


class Study:
    """The study's state on disk under ``out`` and the next runnable task."""

    def __init__(self, out: Path) -> None:
        self.out = out

    # ------------------------------------------------------------------ training state
    def run_folder(self, variant: str, lr: float, seed: int) -> Path:
        method = variant.split("-")[0]
        return self.out / "train" / variant / f"lr{lr:g}" / CONFIGS[method].stem / f"seed{seed}"

    def trained(self, folder: Path, need_adapter: bool = False) -> dict[str, Any] | None:
        """``{"val_loss", "adapter", "s_per_step", ...}`` of a finished run (cached in ``train_done.json``); with
        ``need_adapter``, None when the cached run's adapter is gone (a restored record, see the ledger)."""
        done = folder / "train_done.json"
        if done.is_file():
            info = json.loads(done.read_text())
            if not need_adapter or info.get("adapter") is None or Path(info["adapter"]).is_dir():
                return info
        versions = sorted((folder / "lightning_logs").glob("version_*"), key=lambda p: p.stat().st_mtime)
        for version in reversed(versions):  # the newest finished version
            if (version / "adapter" / "adapter.safetensors").is_file():
                scalars = read_scalars(version)
                per_set = {t.removeprefix("val/loss/"): v[-1] for t, v in scalars.items() if t.startswith("val/loss")}
                if per_set:  # one loss per validation slice (val/loss/<alias>); their mean decides
                    info = {"val_loss": sum(v[1] for v in per_set.values()) / len(per_set),
                            "val_losses": {k: v[1] for k, v in per_set.items()}, "adapter": str(version / "adapter"),
                            "steps": max(v[0] for v in per_set.values()), "s_per_step": seconds_per_step(scalars)}
                    done.write_text(json.dumps(info, indent=1))
                    return info
        log = folder / "fit.log"
        if log.is_file() and "non-finite" in log.read_text(errors="replace").lower():
            info = {"val_loss": float("inf"), "adapter": None, "diverged": True}
            done.write_text(json.dumps(info, indent=1))
            return info
        return None

    def grid(self, variant: str) -> tuple[list[float], float | None]:
        """(lrs still to train at seed 0, the chosen lr once the grid's best has a worse neighbour on each side)."""
        lrs = list(INITIAL_LRS)
        while True:
            runs = {lr: self.trained(self.run_folder(variant, lr, 0)) for lr in lrs}
            missing = [lr for lr, r in runs.items() if r is None]
            if missing:
                return missing, None
            best = min(sorted(lrs), key=lambda lr: runs[lr]["val_loss"])
            step = -1 if best == min(lrs) else 1 if best == max(lrs) else 0
            if step == 0:
                return [], best
            i = LADDER.index(best) + step
            if not 0 <= i < len(LADDER):
                raise SystemExit(f"lr grid of {variant} ran off {LADDER}: best {best:g} is at its edge")
            lrs.append(LADDER[i])

    def choice(self, method: str) -> tuple[str, float] | None:
        """(variant, lr) chosen for ``method``, or None while its grid (or MoELoRA's reduction) is open."""
        if method == "lora":
            return ("lora", lr) if (lr := self.grid("lora")[1]) is not None else None
        if method == "moelora":
            picks = {r: self.grid(f"moelora-{r}")[1] for r in REDUCTIONS}
            if any(lr is None for lr in picks.values()):
                return None
            loss = {r: self.trained(self.run_folder(f"moelora-{r}", lr, 0))["val_loss"] for r, lr in picks.items()}
            reduction = min(REDUCTIONS, key=loss.get)  # ties: sum, the author code's
            return f"moelora-{reduction}", picks[reduction]
        moe = self.choice("moelora")
        if moe is None:
            return None
        variant = f"moelora_no_contrastive-{moe[0].split('-')[1]}"
        return (variant, lr) if (lr := self.grid(variant)[1]) is not None else None

    def train_tasks(self) -> tuple[list[Task], bool]:
        """(runnable training tasks in priority order, whether any training is still open): the seeds of the methods
        already chosen, then the lr grids (LoRA's first)."""
        variants = ["lora"] + [f"moelora-{r}" for r in REDUCTIONS]  # LoRA first: the sanity check needs it
        moe = self.choice("moelora")
        open_ = moe is None  # the no-contrastive grid waits for MoELoRA's reduction
        if moe is not None:
            variants.append(f"moelora_no_contrastive-{moe[0].split('-')[1]}")
        grids = [Task(v.split("-")[0], v, lr, 0, self.run_folder(v, lr, 0)) for v in variants for lr in self.grid(v)[0]]
        tasks: list[Task] = []  # a chosen method's seeds before the other grids: LoRA's seeds make the sanity check
        for method in METHODS:
            chosen = self.choice(method)
            open_ |= chosen is None
            if chosen is not None:
                runs = {s: self.run_folder(chosen[0], chosen[1], s) for s in SEEDS}
                tasks += [Task(method, chosen[0], chosen[1], s, run) for s, run in runs.items()
                          if self.trained(run, need_adapter=self.evals_missing(run)) is None]
        tasks += grids
        return tasks, open_ or bool(tasks)

    @staticmethod
    def evals_missing(run: Path) -> bool:
        """Whether a trained run still lacks one of its evaluations."""
        return any(not any((run / "eval" / s[0]).rglob("test_results.json")) for s in SCORINGS if not s[3])

    def eval_tasks(self) -> list[Task]:
        """Evaluations of the trained chosen runs and of the zero-shot base that have no results yet."""
        loglik = cli_has_loglik()
        tasks = [Task("zero_shot", "zero_shot", None, None, self.out / "zero_shot" / "eval" / s[0], s)
                 for s in SCORINGS]
        for method in METHODS:
            if (chosen := self.choice(method)) is None:
                continue
            for seed in SEEDS:
                run = self.run_folder(chosen[0], chosen[1], seed)
                if (info := self.trained(run, need_adapter=self.evals_missing(run))) is not None:
                    adapter = info["adapter"]
                    tasks += [Task(method, chosen[0], chosen[1], seed, run / "eval" / s[0], s, adapter)
                              for s in SCORINGS if not s[3]]
        return [t for t in tasks if not any(t.folder.rglob("test_results.json"))
                and (t.scoring[1] == "generate" or loglik)]


def read_scalars(version: Path) -> dict[str, list[tuple[int, float, float]]]:
    """``{tag: [(step, value, wall_time), ...]}`` of a Lightning version folder's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(version), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def seconds_per_step(scalars: dict[str, list[tuple[int, float, float]]]) -> float | None:
    """Median wall seconds per optimizer step between successive ``train/loss`` logs."""
    events = scalars.get("train/loss", [])
    rates = sorted((b[2] - a[2]) / (b[0] - a[0]) for a, b in zip(events, events[1:], strict=False) if b[0] > a[0])
    return round(rates[len(rates) // 2], 3) if rates else None


def cli_has_loglik() -> bool:
    """Whether this checkout's MoELoRAModule takes ``scoring`` (log-likelihood evaluation)."""
    return "loglik_prompt" in (ROOT / "moelora_lit" / "lightning" / "module.py").read_text()


def command(task: Task) -> list[str]:
    """The command line of a task (training through ``scripts/sweep.py``, evaluation through ``test``)."""
    if task.scoring is None:
        reduction = task.variant.split("-")[1] if "-" in task.variant else "sum"
        return [sys.executable, str(SWEEP), "--configs", str(CONFIGS[task.method]), "--seeds", str(task.seed),
                "--out", str(task.folder.parents[1]), "--", f"--model.optimizer.init_args.lr={task.lr:g}",
                f"--model.adapter.aux_reduction={reduction}", "--test_after_fit=false"]
    name, scoring, prompt, _ = task.scoring
    config = CONFIGS["lora" if task.method == "zero_shot" else task.method]
    cmd = [sys.executable, "-m", "moelora_lit", "test", "--config", str(config), "--seed_everything=0",
           f"--trainer.default_root_dir={task.folder}"]
    if task.adapter is not None:
        cmd.append(f"--model.init_adapter={task.adapter}")
    if scoring != "generate":
        cmd += [f"--model.scoring={scoring}", f"--model.loglik_prompt={prompt}"]
    else:
        cmd.append(f"--data.test={json.dumps(test_specs(config, GENERATE_LIMIT))}")
    return cmd


def test_specs(config: Path, limit: int) -> list[dict[str, Any]]:
    """The ``data.test`` specs of a config (following its ``config:`` parent), each cut to ``limit`` rows."""
    import yaml

    given = yaml.safe_load(config.read_text())
    specs = (given.get("data") or {}).get("test") or given.get("data.test")
    if specs is None and "config" in given:
        return test_specs(config.parent / given["config"], limit)
    return [spec | {"limit": min(limit, spec.get("limit") or limit)} for spec in specs]


def claim(folder: Path) -> bool:
    """Take ``folder``'s lock (a file holding our pid); a lock of a dead process is taken over."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return False
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)
    return False


def execute(task: Task) -> int:
    """Run one task (its output appended to ``fit.log`` / ``test.log`` in its folder); the exit code."""
    cmd = command(task)
    task.folder.mkdir(parents=True, exist_ok=True)
    log = task.folder / ("study.log" if task.scoring is None else "test.log")
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode


def work(study: Study, phases: tuple[str, ...], jobs: int, prefer: str = "train") -> int:
    """Run tasks until none is left (``jobs`` at a time; ``prefer``'s tasks first); waits while another process
    holds a task this one could run next."""
    guard, busy, failed = threading.Lock(), set(), set()
    print(f"restored {restore(LEDGER, study.out)} records from {LEDGER.relative_to(ROOT)}", flush=True)

    def pick() -> Task | None | str:
        """The next task this process may run; "wait" while others (here or in another process) hold runs."""
        with guard:
            train = study.train_tasks()[0] if "train" in phases else []
            evals = study.eval_tasks() if "evaluate" in phases else []
            if prefer == "evaluate":  # log-likelihood evaluations, then training, then generation (the slowest)
                scored = [t for t in evals if t.scoring[1] != "generate"]
                order = scored + train + [t for t in evals if t.scoring[1] == "generate"]
            else:
                order = train + evals
            tasks = [t for t in order if t.folder not in failed]
            for task in tasks:
                if task.folder not in busy and claim(task.folder):
                    busy.add(task.folder)
                    return task
            return "wait" if tasks or busy else None

    def worker() -> None:
        while (task := pick()) is not None:
            if task == "wait":
                time.sleep(30)
                continue
            start = time.time()
            print(f"{time.strftime('%H:%M:%S')} start {task.label}", flush=True)
            code = execute(task)
            (task.folder / ".lock").unlink(missing_ok=True)
            with guard:
                busy.discard(task.folder)
                done = (study.trained(task.folder, need_adapter=True) is not None if task.scoring is None
                        else any(task.folder.rglob("test_results.json")))
                if not done and code == 0 and task.scoring is None:  # a resumed fit that had nothing left to
                    aside = task.folder.with_name(f"{task.folder.name}.incomplete-{int(time.time())}")  # train but
                    task.folder.rename(aside)  # lost its validation: start it again from scratch
                    print(f"{task.label}: ended without a validation loss; moved to {aside.name}", flush=True)
                elif not done:
                    failed.add(task.folder)
                archive(study.out, LEDGER)
            print(f"{time.strftime('%H:%M:%S')} {'done' if done else f'FAILED (exit {code})'} {task.label} "
                  f"in {time.time() - start:.0f} s", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 1 if failed else 0


def status(study: Study) -> None:
    """Print every run's state and each method's choice."""
    for variant in sorted(p.name for p in (study.out / "train").glob("*")):
        for lr_dir in sorted((study.out / "train" / variant).glob("lr*"), key=lambda p: float(p.name[2:])):
            for seed in SEEDS:
                folder = study.run_folder(variant, float(lr_dir.name[2:]), seed)
                if folder.exists():
                    info = study.trained(folder)
                    state = (f"val_loss {info['val_loss']:.4f}  {info.get('s_per_step')} s/step" if info
                             else "running" if (folder / ".lock").exists() else "unfinished")
                    print(f"{variant:<30} {lr_dir.name:<9} seed {seed}  {state}")
    for method in METHODS:
        print(f"choice {method}: {study.choice(method)}")
    print(f"evaluations left: {len(study.eval_tasks())}; log-likelihood scoring available: {cli_has_loglik()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["train", "evaluate", "all", "status", "table"])
    parser.add_argument("--out", type=Path, default=Path("/work/runs/smollm2_commonsense"))
    parser.add_argument("--jobs", type=int, default=1, help="tasks at a time (one thread each: OMP_NUM_THREADS=1)")
    parser.add_argument("--prefer", choices=["train", "evaluate"], default="train",
                        help="with `all`: which kind of task to take first when both are available (evaluate: "
                             "log-likelihood evaluations, then training, then generation)")
    args = parser.parse_args(argv)
    study = Study(args.out.resolve())
    if args.phase == "status":
        restore(LEDGER, study.out)
        status(study)
        return 0
    if args.phase == "table":  # from the run folders, completed by the committed records
        from smollm2_study_table import write_table  # noqa: PLC0415 (beside this script)

        restore(LEDGER, study.out)
        write_table(study, RESULTS)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    phases = ("train", "evaluate") if args.phase == "all" else (args.phase,)
    return work(study, phases, args.jobs, args.prefer)


if __name__ == "__main__":
    sys.exit(main())
