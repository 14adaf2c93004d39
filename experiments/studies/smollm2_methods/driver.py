"""The SmolLM2-135M methods study: the mixture-of-LoRA family, parameter-matched and tuned alike (see README.md).

    python experiments/studies/smollm2_methods/driver.py all [--jobs 2] [--out DIR]   # resumable, in priority order
    python experiments/studies/smollm2_methods/driver.py status     # what is done, chosen, left (and its cost)
    python experiments/studies/smollm2_methods/driver.py fold --out DIR   # records from DIR's run folders, then tables
    python experiments/studies/smollm2_methods/driver.py table      # results/ tables from the committed records
    python experiments/studies/smollm2_methods/driver.py routing    # results/routing/ tables and figure
    python experiments/studies/smollm2_methods/driver.py params     # results/params.csv (describe, meta device)
    python experiments/studies/smollm2_methods/driver.py steptime   # results/step_times.csv (a few steps per arm)

The arms are data (``arms.yaml``: stacked presets, grids, ranks); the protocol is smollm2_commonsense's
(``experiments/studies/smollm2_commonsense/moelora.yaml``), whose committed records (``runs.csv``,
``examples.csv.gz``, ``routing/``) give the arms it already ran (zero-shot, LoRA, MoELoRA, MoELoRA without the
contrastive loss); they are read from there, not copied. This study's own records in ``results/`` hold the new arms.
The machinery is :mod:`moelora_lit.analysis` (``study``: grids and choices, ``runner``: jobs, ``records``: tables);
beside this file, ``methods_protocol.py`` holds the protocol as data, ``methods_routing.py`` the routing analysis and
``methods_sizing.py`` the parameter counts and step times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the study's helpers beside this file

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from methods_protocol import (  # noqa: E402
    CSV_COLUMNS,
    EVALUATIONS,
    METHODS,
    METRIC,
    OLD_RESULTS,
    RESULTS,
    ROOT,
    SCORED,
    SEEDS,
    SETS,
    STEPS,
    TABLES,
    arms,
    read_arms,
)
from methods_routing import write_routing  # noqa: E402
from methods_sizing import step_times, write_params  # noqa: E402

from moelora_lit.analysis import records  # noqa: E402
from moelora_lit.analysis.runner import Job, portable, run_jobs  # noqa: E402
from moelora_lit.analysis.study import Study  # noqa: E402


def comparisons(names: list[str]) -> list[tuple[str, str, None]]:
    """Every arm minus LoRA and minus MoELoRA (and LoRA minus zero-shot, the sanity check)."""
    out = [("lora", "zero_shot", None)]
    out += [(a, "lora", None) for a in names if a != "lora"]
    out += [(a, "moelora", None) for a in names if a not in ("lora", "moelora")]
    return out


def read_runs(*paths: Path) -> pd.DataFrame | None:
    frames = [pd.read_csv(p) for p in paths if p.is_file()]
    return pd.concat(frames, ignore_index=True) if frames else None


def combined_record(results: Path = RESULTS, old: Path = OLD_RESULTS) -> pd.DataFrame:
    """The reused arms' per-example record and this study's, as one record."""
    frames = [records.read_record(old / "examples.csv.gz"), records.read_record(results / "examples.csv.gz")]
    return records.normalise(pd.concat([f for f in frames if len(f)] or frames[:1], ignore_index=True))


def build(out: Path, results: Path = RESULTS, old: Path = OLD_RESULTS) -> Study:
    """The study over the run folders under ``out`` and the committed records (the old study's and this one's)."""
    record = combined_record(results, old)
    done = records.evaluated(record)
    return Study(arms(), out, SEEDS, METRIC, higher_is_better=False, evaluations=EVALUATIONS, zero_shot_arm="lora",
                 record=read_runs(old / "runs.csv", results / "runs.csv"), done_evaluations=done)


def save_records(study: Study, results: Path = RESULTS, job: Job | None = None, old: Path = OLD_RESULTS) -> None:
    """Take this study's finished runs, evaluations, routing probes and the job's command into ``results``
    (rows the old study's records already hold stay there)."""
    results.mkdir(parents=True, exist_ok=True)
    old_runs = read_runs(old / "runs.csv")
    known = set() if old_runs is None else set(
        zip(old_runs["variant"], old_runs["lr"].astype(float), old_runs["seed"], strict=True))
    runs = study.training_record()
    keys = zip(runs["variant"], runs["lr"], runs["seed"], strict=True)
    runs = runs[[(v, float(lr), int(s)) not in known for v, lr, s in keys]]
    runs.to_csv(results / "runs.csv", index=False)
    records.fold_predictions(study.out, results / "examples.csv.gz")
    study.save_probes(results / "routing")
    # every job's command: the job's, or those its run folders recorded
    found = [json.loads(p.read_text()).get("command") for p in sorted(study.out.rglob("run.json"))]
    records.add_commands(results / "commands.txt", [*found, portable(job.command)] if job is not None else found)


# ------------------------------------------------------------------------------------------------- tables
def choices(study: Study) -> dict[str, dict]:
    out = {}
    for arm in study.arms:
        if (chosen := study.choice(arm)) is not None:
            out[arm] = {"variant": chosen[0], "lr": chosen[2]} | {k: v for k, v in chosen[1].items()}
    return out


def grid_table(study: Study, results: Path = RESULTS) -> pd.DataFrame:
    """Every training run of every arm with its validation loss, and which (variant, lr) the arm chose."""
    picked = choices(study)
    runs = study.training_record()
    runs.insert(0, "arm", runs["variant"].str.split("-").str[0])
    runs = runs[runs["arm"].isin(study.arms)]
    runs["chosen"] = [int(a in picked and picked[a]["variant"] == v and float(picked[a]["lr"]) == float(lr))
                      for a, v, lr in zip(runs["arm"], runs["variant"], runs["lr"], strict=True)]
    order = {a: i for i, a in enumerate(study.arms)}
    runs = runs.sort_values(["arm", "variant", "lr", "seed"], key=lambda s: s.map(order) if s.name == "arm" else s)
    return runs.rename(columns={"score": "val_loss"}).reset_index(drop=True)


def result_rows(record: pd.DataFrame, picked: dict[str, dict], params: dict[str, int]) -> pd.DataFrame:
    """``methods_commonsense.csv``: one row per arm, seed, dataset and scoring (:data:`CSV_COLUMNS`)."""
    table = records.accuracy(record[record["evaluation"].isin(SCORED)])
    table = table[table["method"].isin(METHODS)]
    table["scoring"] = table["evaluation"].map(lambda e: SCORED[e][0])
    table["prompt"] = table["evaluation"].map(lambda e: SCORED[e][1])
    table["lr"] = table["method"].map(lambda m: picked.get(m, {}).get("lr"))
    table["trainable_params"] = table["method"].map(lambda m: params.get(m, 0 if m == "zero_shot" else None))
    table["trainable_params"] = table["trainable_params"].astype("Int64")
    table["method"] = pd.Categorical(table["method"], METHODS)
    table = table.sort_values(["method", "seed", "dataset", "scoring"], na_position="first")
    return table[CSV_COLUMNS].reset_index(drop=True)


def answer(summary: dict, steps: pd.Series, params: dict[str, int], picked: dict[str, dict]) -> str:
    """The plain answer: each arm against a tuned LoRA (log-likelihood, training prompt), with its cost; ``steps``
    holds seconds per step by arm (:func:`step_seconds`)."""
    lines = ["### Against a tuned LoRA (log-likelihood, training prompt, `acc`, examples paired over shared seeds)",
             "", "| arm | seeds | ARC-Easy | BoolQ | PIQA (transfer) | beats LoRA on | trainable / LoRA's | "
             f"s/step / LoRA's ({steps.name}) |", "|---" * 8 + "|"]
    for arm in METHODS[2:]:
        rows = {r["dataset"]: r for r in summary["paired"] if r["a"] == arm and r["b"] == "lora"
                and r["evaluation"] == "loglikelihood-training"}
        if not rows:
            continue
        cells, wins = [], []
        for d in SETS:
            e = rows.get(d, {}).get("examples_paired")
            cells.append(records.points(e["t95"][0], e["diff"], e["t95"][1], "+") if e else "-")
            if e and e["t95"][0] > 0:
                wins.append(SETS[d])
        seeds = len(next(iter(rows.values()))["examples_paired"].get("seeds", []))
        ratio = params[arm] / params["lora"] if arm in params and "lora" in params else float("nan")
        time_ratio = steps.get(arm, np.nan) / steps.get("lora", np.nan)
        lines.append(f"| {arm} | {seeds} | " + " | ".join(cells) + f" | {', '.join(wins) or 'none'} | {ratio:.2f} | "
                     f"{time_ratio:.2f} |")
    return "\n".join(lines) + "\n\nPoints, a minus LoRA, 95% t interval over the paired test examples; 'beats' = the " \
                              "interval above 0.\n"


def step_seconds(grid: pd.DataFrame, results: Path = RESULTS) -> pd.Series:
    """Seconds per step by arm: ``step_times.csv`` (each arm alone on quiet cores) where it exists, else the median
    of the study's runs (wall time, whatever else shared the cores)."""
    path = results / "step_times.csv"
    if path.is_file():
        return pd.read_csv(path).set_index("arm")["s_per_step"].rename("8 steps alone, step_times.csv")
    return grid.groupby("arm")["s_per_step"].median().rename("median of runs")


def read_params(results: Path = RESULTS) -> dict[str, int]:
    path = results / "params.csv"
    return dict(zip(*pd.read_csv(path)[["arm", "trainable_params"]].T.values, strict=True)) if path.is_file() else {}


def write_tables(study: Study, results: Path = RESULTS, out: Path | None = None, old: Path = OLD_RESULTS) -> None:
    """``methods_commonsense.csv``, ``methods_grid.csv``, ``summary.json`` and ``table.md`` from the committed
    records (into ``out``)."""
    out = out or results
    out.mkdir(parents=True, exist_ok=True)
    record = combined_record(results, old)
    record = record[record["method"].isin(METHODS)]
    picked, params = choices(study), {k: int(v) for k, v in read_params(results).items()}
    result_rows(record, picked, params).to_csv(out / "methods_commonsense.csv", index=False)
    grid = grid_table(study, results)
    grid.to_csv(out / "methods_grid.csv", index=False)
    scored = record[record["evaluation"].isin(SCORED)]
    summary = records.summarise(scored, comparisons([m for m in METHODS[1:] if m in set(scored["method"])]))
    payload = {"choices": picked, "trainable_params": params} | summary
    text = json.dumps(payload, indent=1, default=lambda v: None if pd.isna(v) else float(v))
    (out / "summary.json").write_text(text + "\n")
    body = records.markdown(summary, SETS, TABLES) if len(scored) else "No evaluation recorded yet.\n"
    (out / "table.md").write_text(answer(summary, step_seconds(grid, results), params, picked) + "\n" + body)
    print(f"tables from {len(record)} examples -> {out}")


# ------------------------------------------------------------------------------------------------- status
def status(study: Study, per_step: float | None = None) -> str:
    """The training record with each arm's choice, what is left, and its cost at ``per_step`` seconds per step
    (default: the median of this study's finished runs, else of the reused ones)."""
    grid = grid_table(study)
    lines = [grid.to_string(index=False), ""]
    lines += [f"choice {arm}: {study.choice(arm)}" for arm in study.arms]
    train, evals = study.train_jobs(), study.eval_jobs()
    new = grid[~grid["arm"].isin([a for a, s in read_arms().items() if s.get("reused")])]
    per_step = per_step or (new if len(new) else grid)["s_per_step"].median()
    open_arms = sum(study.choice(arm) is None for arm in study.arms)  # their seeds and evaluations are not jobs yet
    runs = len(train) + open_arms * (len(SEEDS) - 1)
    gen = sum("generate" in j.label for j in evals) + open_arms * len(SEEDS)
    loglik = len(evals) - sum("generate" in j.label for j in evals) + open_arms * len(SEEDS)
    hours = (runs * STEPS * per_step + loglik * 360 + gen * 540) / 3600
    lines.append(f"training runs left: {runs} (a grid whose choice sits at its edge adds runs); evaluations left: "
                 f"{loglik} log-likelihood, {gen} generation; at {per_step:.1f} s per step (6 min a log-likelihood "
                 f"evaluation, 9 a generation) about {hours:.1f} core-hours, {hours / 2:.1f} h on 2 cores")
    return "\n".join(lines) + "\n"


def ordered_jobs(study: Study, phase: str) -> list[Job]:
    """Priority: one arm at a time, in ``arms.yaml``'s order, so that each arm's result is whole before the next
    arm's runs start: its lr grid (first seed), its other seeds, its log-likelihood evaluations; generation last.
    With two runs at a time, the second takes the next arm's grid while an arm waits for its choice."""
    train = study.train_jobs() if phase in ("train", "all") else []
    evals = study.eval_jobs() if phase in ("evaluate", "all") else []
    rank = {arm: i for i, arm in enumerate(study.arms)}          # zero-shot (no arm) first

    def arm_rank(job: Job) -> int:
        return rank.get(job.meta.get("arm", job.meta.get("method")), -1)

    fast = [j for j in evals if "generate" not in j.label]
    return sorted(train + fast, key=arm_rank) + [j for j in evals if "generate" in j.label]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["train", "evaluate", "all", "status", "fold", "table", "routing",
                                          "params", "steptime"])
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2_methods"), help="run folders")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # configs and their data paths are relative to the repository root
    study = build(args.out)
    if args.phase == "status":
        print(status(study), end="")
    elif args.phase == "fold":  # what another checkout's driver finished under --out, into this checkout's records
        save_records(study)
        study = build(args.out)
        write_tables(study)
        write_routing()
        (RESULTS / "status.txt").write_text(status(study))
    elif args.phase == "table":
        write_tables(study)
    elif args.phase == "routing":
        write_routing()
    elif args.phase == "params":
        write_params()
    elif args.phase == "steptime":
        step_times(args.out, args.jobs)
    else:
        def after(job: Job, finished: bool) -> None:
            nonlocal study
            save_records(study, job=job)
            study = build(args.out)

        return 1 if run_jobs(lambda: ordered_jobs(study, args.phase), jobs=args.jobs, threads=1, after=after) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
