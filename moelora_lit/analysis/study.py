"""A study as data: arms (method name -> stacked configs, an lr grid, an optional grid over config keys), seeds,
a validation metric and evaluations; the learning rate chosen on validation, then seeds, then evaluations.

Runs live in ``<out>/train/<variant>/lr<LR>/seed<S>`` (``variant``: the arm, plus ``-<value>`` per grid key) and
``<out>/<variant or zero_shot>/.../eval/<evaluation>``; every job goes through :func:`runner.run_jobs`. A training
run is finished when its folder holds an adapter and the validation metric (cached in ``train_done.json``) or when
the study's committed training record lists it; a run that still owes an evaluation but whose adapter is gone (a
fresh clone) is trained again.

Selection (:func:`select_lr`): per arm and grid value, the lr with the best mean validation metric at the first
seed; the grid extends along :data:`LADDER` until the choice has a worse neighbour on both sides (a choice at the
ladder's end is reported as needing extension). Grid keys are chosen the same way (the best variant's score), or
taken from another arm (``follow``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from moelora_lit.analysis.logs import last_values, newest, read_scalars, seconds_per_step
from moelora_lit.analysis.runner import Job, fit_command

LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
RECORD_COLUMNS = ["variant", "lr", "seed", "score", "steps", "s_per_step"]


@dataclass(frozen=True)
class Arm:
    """One method of a study: ``configs`` stacked with ``--config`` (repository-relative), its initial lr grid,
    a grid over config keys (``{"model.adapter.aux_reduction": ("sum", "mean")}``: one lr grid per value), or
    ``follow``: the arm whose chosen grid values this one takes; ``overrides`` for every run."""

    configs: tuple[str, ...]
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    grid: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    follow: str | None = None
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evaluation:
    """A ``test`` of every chosen run (and of the untrained base when ``zero_shot``) with ``overrides``;
    ``limit`` cuts each test set; ``trained=False`` evaluates the base only."""

    name: str
    overrides: tuple[str, ...] = ()
    zero_shot: bool = True
    trained: bool = True
    limit: int | None = None


def select_lr(scores: Mapping[float, float], higher_is_better: bool, ladder: Sequence[float] = LADDER
              ) -> tuple[float, float | None, bool]:
    """(best lr, the next lr to run or None, bracketed): the best has a worse neighbour on both sides when
    ``bracketed``; otherwise the next rung of ``ladder`` beyond it (None when the ladder ends there)."""
    lrs = sorted(scores)
    sign = -1.0 if higher_is_better else 1.0
    best = min(lrs, key=lambda lr: sign * scores[lr])  # ties: the lower lr
    step = -1 if best == lrs[0] else 1 if best == lrs[-1] else 0
    if step == 0:
        return best, None, True
    i = ladder.index(best) + step if best in ladder else -1
    return best, (ladder[i] if 0 <= i < len(ladder) else None), False


class Study:
    """The state of a study on disk under ``out`` (and its committed ``record`` of training runs)."""

    def __init__(self, arms: Mapping[str, Arm], out: Path, seeds: Sequence[int] = (0, 1, 2),
                 metric: str = "val/acc", higher_is_better: bool = True, evaluations: Sequence[Evaluation] = (),
                 zero_shot_arm: str | None = None, record: pd.DataFrame | None = None,
                 done_evaluations: set[tuple[str, Any, str]] | frozenset = frozenset()) -> None:
        self.arms, self.out, self.seeds = dict(arms), Path(out), tuple(seeds)
        self.metric, self.higher = metric, higher_is_better
        self.evaluations, self.zero_shot_arm = list(evaluations), zero_shot_arm or next(iter(arms))
        self.record = {} if record is None else {
            (r.variant, float(r.lr), int(r.seed)): {k: r._asdict()[k] for k in ("score", "steps", "s_per_step")}
            | {"adapter": None} for r in record.itertuples(index=False)}
        self.done_evaluations = set(done_evaluations)  # (method, seed, evaluation) in the committed record

    # ------------------------------------------------------------------------------------------ training
    def variants(self, arm: str) -> list[dict[str, str]]:
        keys = self.arms[arm].grid
        combos: list[dict[str, str]] = [{}]
        for key, values in keys.items():
            combos = [c | {key: str(v)} for c in combos for v in values]
        return combos

    @staticmethod
    def variant(arm: str, values: Mapping[str, str]) -> str:
        return "-".join([arm, *values.values()])

    def run_folder(self, variant: str, lr: float, seed: int) -> Path:
        return self.out / "train" / variant / f"lr{lr:g}" / f"seed{seed}"

    def trained(self, variant: str, lr: float, seed: int) -> dict[str, Any] | None:
        """``{"score", "steps", "s_per_step", "adapter"}`` of a finished run (adapter None when only recorded)."""
        folder = self.run_folder(variant, lr, seed)
        done = folder / "train_done.json"
        if done.is_file():
            return json.loads(done.read_text())
        adapter = newest(folder, "adapter.safetensors")
        if adapter is not None:
            scalars = read_scalars(adapter.parents[1])
            values = last_values(scalars, self.metric)
            if values:
                info = {"score": sum(v for _, v in values.values()) / len(values), "scores": {
                    t: v for t, (_, v) in values.items()}, "steps": max(s for s, _ in values.values()),
                        "s_per_step": seconds_per_step(scalars), "adapter": str(adapter.parent)}
                done.write_text(json.dumps(info, indent=1))
                return info
        log = folder / "run.log"
        if log.is_file() and "non-finite" in log.read_text(errors="replace").lower():
            info = {"score": float("-inf") if self.higher else float("inf"), "adapter": None, "diverged": True}
            done.write_text(json.dumps(info, indent=1))
            return info
        return self.record.get((variant, float(lr), int(seed)))

    def grid_state(self, variant: str, arm: str) -> tuple[list[float], tuple[float, float | None, bool] | None]:
        """(lrs still to train at the first seed, the selection once every lr of the grid has a score)."""
        lrs = list(self.arms[arm].lrs)
        while True:
            runs = {lr: self.trained(variant, lr, self.seeds[0]) for lr in lrs}
            missing = [lr for lr, r in runs.items() if r is None]
            if missing:
                return missing, None
            best, extend, bracketed = select_lr({lr: r["score"] for lr, r in runs.items()}, self.higher)
            if bracketed or extend is None:
                return [], (best, extend, bracketed)
            lrs.append(extend)

    def choice(self, arm: str) -> tuple[str, dict[str, str], float] | None:
        """(variant, its grid values, lr) chosen for ``arm``; None while its grid is open."""
        spec = self.arms[arm]
        if spec.follow is not None:
            followed = self.choice(spec.follow)
            if followed is None:
                return None
            values = {k: v for k, v in followed[1].items() if k in spec.grid}
            options = [values]
        else:
            options = self.variants(arm)
        picks = {}
        for values in options:
            variant = self.variant(arm, values)
            state = self.grid_state(variant, arm)[1]
            if state is None:
                return None
            picks[variant] = (values, state[0], self.trained(variant, state[0], self.seeds[0])["score"])
        sign = -1.0 if self.higher else 1.0
        variant = min(picks, key=lambda v: sign * picks[v][2])  # ties: the first value listed
        return variant, picks[variant][0], picks[variant][1]

    def evaluations_left(self, method: str, seed: int, variant: str, lr: float) -> list[Evaluation]:
        return [e for e in self.evaluations if e.trained and (method, seed, e.name) not in self.done_evaluations
                and newest(self.run_folder(variant, lr, seed) / "eval" / e.name, "test_results.json") is None]

    def train_jobs(self) -> list[Job]:
        """Runs to train, in priority order: the seeds of the arms already chosen, then the open lr grids."""
        seeds, grids = [], []
        for arm, spec in self.arms.items():
            chosen = self.choice(arm)
            if chosen is not None:
                variant, values, lr = chosen
                for seed in self.seeds:
                    info = self.trained(variant, lr, seed)
                    if info is None or (info.get("adapter") is None and not info.get("diverged")
                                        and self.evaluations_left(arm, seed, variant, lr)):
                        seeds.append(self.fit_job(arm, variant, values, lr, seed))
                continue
            if spec.follow is not None and self.choice(spec.follow) is None:
                continue  # waits for the followed arm's grid values
            options = self.variants(arm) if spec.follow is None else [
                {k: v for k, v in self.choice(spec.follow)[1].items() if k in spec.grid}]
            for values in options:
                variant = self.variant(arm, values)
                grids += [self.fit_job(arm, variant, values, lr, self.seeds[0])
                          for lr in self.grid_state(variant, arm)[0]]
        return seeds + grids

    def fit_job(self, arm: str, variant: str, values: Mapping[str, str], lr: float, seed: int) -> Job:
        folder = self.run_folder(variant, lr, seed)
        extra = [*self.arms[arm].overrides, *(f"--{k}={v}" for k, v in values.items()),
                 f"--model.optimizer.init_args.lr={lr:g}", "--test_after_fit=false"]
        cmd = fit_command(self.arms[arm].configs, folder, seed, extra)

        def done(_: Path) -> bool:
            self.trained(variant, lr, seed)  # writes train_done.json once the run has its validation metric
            return (folder / "train_done.json").is_file()

        return Job(f"train {variant} lr {lr:g} seed {seed}", folder, cmd, done=done,
                   meta={"arm": arm, "variant": variant, "lr": lr, "seed": seed})

    # ---------------------------------------------------------------------------------------- evaluation
    def eval_jobs(self) -> list[Job]:
        """Evaluations with no result yet: the untrained base, then every trained seed of every chosen arm."""
        jobs = [self.eval_job("zero_shot", None, self.out / "zero_shot" / "eval" / e.name, e, {}, None)
                for e in self.evaluations if e.zero_shot and ("zero_shot", None, e.name) not in self.done_evaluations]
        for arm in self.arms:
            if (chosen := self.choice(arm)) is None:
                continue
            variant, values, lr = chosen
            for seed in self.seeds:
                info = self.trained(variant, lr, seed)
                if info is None or info.get("adapter") is None:
                    continue
                jobs += [self.eval_job(arm, seed, self.run_folder(variant, lr, seed) / "eval" / e.name, e, values,
                                       info["adapter"]) for e in self.evaluations_left(arm, seed, variant, lr)]
        return [j for j in jobs if newest(j.folder, "test_results.json") is None]

    def eval_job(self, method: str, seed: int | None, folder: Path, evaluation: Evaluation,
                 values: Mapping[str, str], adapter: str | None) -> Job:
        configs = self.arms[self.zero_shot_arm if method == "zero_shot" else method].configs
        cmd = [sys.executable, "-m", "moelora_lit", "test"]
        for config in configs:
            cmd += ["--config", str(config)]
        cmd += ["--seed_everything=0", f"--trainer.default_root_dir={folder}",
                *(f"--{k}={v}" for k, v in values.items()), *evaluation.overrides]
        if adapter is not None:
            cmd.append(f"--model.init_adapter={adapter}")
        if evaluation.limit is not None:
            cmd.append(f"--data.test={json.dumps(test_specs(configs, evaluation.limit))}")
        label = f"eval {evaluation.name} {method}" + ("" if seed is None else f" seed {seed}")
        return Job(label, folder, cmd, log_name="test.log",
                   meta={"method": method, "seed": seed, "evaluation": evaluation.name})

    def save_probes(self, folder: Path) -> None:
        """Each chosen run's routing probe (``routing_probe.json``) as ``folder/<arm>_seed<S>.json``, without the
        per-task expert use (the studies' routing analysis does not read it)."""
        for arm in self.arms:
            chosen = self.choice(arm)
            for seed in self.seeds if chosen else ():
                probe = newest(self.run_folder(chosen[0], chosen[2], seed), "routing_probe.json")
                if probe is not None:
                    folder.mkdir(parents=True, exist_ok=True)
                    payload = json.loads(probe.read_text())
                    for state in ("step0", "trained"):
                        payload[state].pop("use", None)
                    (folder / f"{arm}_seed{seed}.json").write_text(json.dumps(payload))

    def training_record(self) -> pd.DataFrame:
        """Every finished training run (the committed record's rows and those on disk): :data:`RECORD_COLUMNS`."""
        keys = set(self.record)
        for done in (self.out / "train").glob("*/lr*/seed*/train_done.json") if (self.out / "train").is_dir() else []:
            keys.add((done.parents[2].name, float(done.parents[1].name[2:]), int(done.parent.name[4:])))
        rows = [{"variant": v, "lr": lr, "seed": s} | {k: (self.trained(v, lr, s) or {}).get(k)
                                                       for k in RECORD_COLUMNS[3:]} for v, lr, s in keys]
        return pd.DataFrame(rows, columns=RECORD_COLUMNS).sort_values(["variant", "lr", "seed"]).reset_index(drop=True)


def test_specs(configs: Sequence[str | os.PathLike], limit: int) -> list[dict[str, Any]]:
    """The ``data.test`` specs of the last config that sets them (following ``config:`` includes), cut to ``limit``."""
    import yaml

    for config in reversed([Path(c) for c in configs]):
        given = yaml.safe_load(config.read_text())
        specs = (given.get("data") or {}).get("test") or given.get("data.test")
        if specs is None and "config" in given:
            specs = test_specs([config.parent / given["config"]], limit) or None
        if specs:
            return [dict(spec) | {"limit": min(limit, spec.get("limit") or limit)} for spec in specs]
    return []
