"""The one job runner of the studies and sweeps: each job is one ``python -m moelora_lit ...`` in its own folder.

:func:`run_jobs` takes a list of :class:`Job` or a function that returns the jobs still to run (a study whose grid
grows as results come in), runs ``jobs`` of them at a time (one thread each with ``threads=1``), writes each job's
output to a log file in its folder and a JSON record of it (command, exit code, wall time), skips finished jobs and
reruns unfinished ones (the command decides how to resume, e.g. :func:`fit_command` from ``last.ckpt``). A lock
file per folder lets several processes share one study; a job whose process died is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from moelora_lit.analysis.logs import newest

ROOT = Path(__file__).resolve().parents[2]  # a checkout's root (runs find moelora_lit even when not installed)


def has_test_results(folder: Path) -> bool:
    """The default ``done`` test: a ``test_results.json`` anywhere under the job's folder."""
    return newest(folder, "test_results.json") is not None


@dataclass
class Job:
    """One command run in ``folder`` (its ``trainer.default_root_dir``).

    Attributes:
        label: what the progress lines call it.
        command: ``[python, -m, moelora_lit, ...]`` (or any command when run isolated).
        done: whether the folder already holds the job's result.
        log_name, meta_name: the log file and the JSON record written in ``folder``.
        meta: extra fields for the record.
        summary: what to print after a successful run (None: it left no result, a failure).
    """

    label: str
    folder: Path
    command: list[str]
    done: Callable[[Path], bool] = has_test_results
    log_name: str = "run.log"
    meta_name: str = "run.json"
    meta: dict[str, Any] = field(default_factory=dict)
    summary: Callable[[], str | None] | None = None


def fit_command(configs: Sequence[str | os.PathLike], folder: Path, seed: int, extra: Sequence[str] = ()) -> list[str]:
    """``python -m moelora_lit fit`` of stacked ``configs`` at ``seed`` into ``folder``, resuming from the newest
    ``last.ckpt`` an earlier attempt left there; ``extra`` overrides come last and win."""
    cmd = [sys.executable, "-m", "moelora_lit", "fit"]
    for config in configs:
        cmd += ["--config", str(config)]
    cmd += ["--seed_everything", str(seed), "--data.seed", str(seed), "--trainer.default_root_dir", str(folder)]
    last = newest(folder, "last.ckpt")
    return cmd + (["--ckpt_path", str(last)] if last else []) + list(extra)


def portable(command: str | Sequence[str], root: Path = ROOT) -> str:
    """A command line as run from the repository root: ``python``, and paths under ``root`` or its parent written
    relative to ``root`` (``experiments/...``, ``../shared/...``)."""
    text = command if isinstance(command, str) else shlex.join(str(c) for c in command)
    text = re.sub(r"^\S*/bin/python3?(\.\d+)? ", "python ", text)
    text = text.replace(str(root) + "/", "").replace(str(root.parent) + "/", "../")
    return re.sub(r"/[^\s\"',]*/shared/data/", "../shared/data/", text)


def claim(folder: Path) -> bool:
    """Take ``folder``'s lock (a file holding our pid); the lock of a dead process is taken over."""
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
                pid = int(lock.read_text() or 0)
                if pid == os.getpid():
                    return False  # another thread of this process holds it
                os.kill(pid, 0)
                return False
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)
    return False


def _in_process(args: list[str], log: TextIO) -> int:
    """``python -m moelora_lit <args>`` inside this process (LightningCLI), its prints going to ``log``."""
    from moelora_lit.data import ReasoningDataModule
    from moelora_lit.lightning.cli import MoELoRACLI
    from moelora_lit.lightning.module import MoELoRAModule

    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            MoELoRACLI(MoELoRAModule, ReasoningDataModule, save_config_kwargs={"overwrite": True}, args=args)
        except SystemExit as err:
            return err.code if isinstance(err.code, int) else 1
        except Exception:
            traceback.print_exc(file=log)
            return 1
    return 0


def run_jobs(source: Sequence[Job] | Callable[[], Sequence[Job]], jobs: int = 1, threads: int | None = None,
             isolate: bool = True, collect_only: bool = False, stream: TextIO | None = None, poll: float = 10.0,
             after: Callable[[Job, bool], None] | None = None) -> list[str]:
    """Run every unfinished job, ``jobs`` at a time; one line per job; the failures (empty when all finished).

    Args:
        source: the jobs, or a function returning those still to run in priority order (asked again after each
            job; the run ends when it returns none and none is running).
        threads: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` of each job.
        isolate: False runs the jobs one after another in this process (tests; commands must be
            ``python -m moelora_lit ...``).
        collect_only: run nothing; report the unfinished jobs as failures.
        poll: seconds to wait while other processes hold every runnable job.
        after: called with each job and whether it finished, under the runner's lock.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    static = not callable(source)
    listed = list(source) if static else []
    guard, busy, failed, seen = threading.Lock(), set(), [], set()

    def say(text: str) -> None:
        print(text, file=stream or sys.stdout, flush=True)

    def pick() -> Job | str | None:
        with guard:
            todo = listed if static else list(source())
            pending = False
            for job in todo:
                if job.folder in busy or job.folder in seen:
                    continue
                if job.done(job.folder):
                    seen.add(job.folder)
                    say(f"{job.label}  skipped (finished)")
                    continue
                if collect_only:
                    seen.add(job.folder)
                    say(f"{job.label}  not finished (collect only)")
                    failed.append(f"{job.label}: not finished")
                    continue
                if claim(job.folder):
                    busy.add(job.folder)
                    return job
                pending = True  # another process holds it
            return "wait" if pending or (busy and not static) else None

    def one(job: Job) -> None:
        job.folder.mkdir(parents=True, exist_ok=True)
        record = job.meta | {"command": portable(job.command)}
        (job.folder / job.meta_name).write_text(json.dumps(record, indent=1))
        start = time.perf_counter()
        with open(job.folder / job.log_name, "a") as log:
            log.write(f"$ {shlex.join(job.command)}\n")
            log.flush()
            if isolate:
                code = subprocess.run(job.command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            else:
                code = _in_process(job.command[3:], log)
        wall = time.perf_counter() - start
        (job.folder / job.meta_name).write_text(json.dumps(record | {"returncode": code, "wall_s": wall}, indent=1))
        (job.folder / ".lock").unlink(missing_ok=True)
        finished = job.done(job.folder)
        scores = (job.summary() if job.summary else "ok") if finished else None
        with guard:
            busy.discard(job.folder)
            seen.add(job.folder)
            if code != 0 or scores is None:
                tail = "".join((job.folder / job.log_name).read_text().splitlines(keepends=True)[-15:])
                say(f"{job.label}  FAILED (exit {code}) after {wall:.1f} s; last lines of "
                    f"{job.folder / job.log_name}:\n{tail}")
                failed.append(f"{job.label}: exit {code}, see {job.folder / job.log_name}")
            else:
                say(f"{job.label}  {wall:7.1f} s  {scores}")
            if after is not None:
                after(job, finished)

    def worker() -> None:
        while (job := pick()) is not None:
            if job == "wait":
                time.sleep(poll)
                continue
            one(job)

    workers = [threading.Thread(target=worker) for _ in range(max(1, jobs) if isolate else 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return failed
