"""A study's committed per-example record and the tables rebuilt from it.

The record is one CSV (gzip-compressed, written byte-stable) with a row per evaluated example:
:data:`COLUMNS` = ``method, seed, evaluation, dataset, index, pred, pred_norm, gold, correct, correct_norm``
(``pred_norm`` / ``correct_norm``: the length-normalised log-likelihood pick, empty for generation; ``zero_shot``
has no seed). :func:`from_predictions` converts a run's ``predictions.jsonl``; :func:`accuracy` gives one row per
method, seed, evaluation and dataset; :func:`summarise` the intervals and paired differences (scipy-based
:mod:`moelora_lit.analysis.stats`).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moelora_lit.analysis.stats import examples_interval, paired_examples, paired_t, t_interval, wilson

COLUMNS = ["method", "seed", "evaluation", "dataset", "index", "pred", "pred_norm", "gold", "correct", "correct_norm"]
KEYS = ["method", "seed", "evaluation", "dataset"]


def from_predictions(path: str | os.PathLike, method: str, seed: int | None, evaluation: str) -> pd.DataFrame:
    """Record rows of one ``predictions.jsonl`` (log-likelihood rows carry ``index``; generation rows are
    numbered in file order per dataset; the generated text and prompts are dropped)."""
    rows, counts = [], {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        dataset = r["dataset"]
        index = r.get("index", counts.get(dataset, 0))
        counts[dataset] = counts.get(dataset, 0) + 1
        pred = r["pred"] if "pred" in r else r.get("extracted")
        rows.append({"method": method, "seed": seed, "evaluation": evaluation, "dataset": dataset, "index": index,
                     "pred": pred, "pred_norm": r.get("pred_norm"), "gold": r.get("gold"),
                     "correct": int(bool(r["correct"])),
                     "correct_norm": int(bool(r["correct_norm"])) if "correct_norm" in r else None})
    return pd.DataFrame(rows, columns=COLUMNS)


def normalise(record: pd.DataFrame) -> pd.DataFrame:
    """Types and order of a record: seeds as nullable integers, picks as text, rows sorted by :data:`KEYS`."""
    out = record[COLUMNS].copy()
    out["seed"] = pd.to_numeric(out["seed"]).astype("Int64")
    for column in ("pred", "pred_norm", "gold"):
        out[column] = out[column].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v))
                                      else str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
    out["correct_norm"] = pd.to_numeric(out["correct_norm"]).astype("Int64")
    out = out.drop_duplicates(KEYS + ["index"], keep="last")
    return out.sort_values(KEYS + ["index"], na_position="first").reset_index(drop=True)


def write_record(record: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``record`` as a gzip CSV that is the same bytes for the same rows (no timestamp in the header)."""
    text = normalise(record).to_csv(index=False, lineterminator="\n")
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(text.encode())


def read_record(path: str | os.PathLike) -> pd.DataFrame:
    """A record written by :func:`write_record` (an empty one if the file does not exist)."""
    if not Path(path).is_file():
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.read_csv(path, dtype={"pred": str, "pred_norm": str, "gold": str}, keep_default_na=False,
                        na_values={"seed": [""], "correct_norm": [""]})
    return normalise(frame)


def evaluated(record: pd.DataFrame) -> set[tuple[str, int | None, str]]:
    """``(method, seed, evaluation)`` of every evaluation a record holds (seed None for zero-shot rows)."""
    rows = record[["method", "seed", "evaluation"]].drop_duplicates().itertuples(index=False)
    return {(m, None if pd.isna(s) else int(s), e) for m, s, e in rows}


def fold_predictions(out: Path, path: Path) -> None:
    """Add every evaluation's ``predictions.jsonl`` under ``out`` (``eval/<evaluation>/...`` of a run folder laid out
    as ``zero_shot/...`` or ``train/<variant>/lr<lr>/seed<S>/...``) to the record at ``path``."""
    frames = [read_record(path)]
    for found in sorted(out.rglob("eval/*/**/predictions.jsonl")):
        parts = found.relative_to(out).parts
        evaluation = parts[parts.index("eval") + 1]
        method, seed = ("zero_shot", None) if parts[0] == "zero_shot" else (parts[1].split("-")[0], int(parts[3][4:]))
        frames.append(from_predictions(found, method, seed, evaluation))
    write_record(pd.concat([f for f in frames if len(f)] or frames[:1]), path)


def add_commands(path: Path, commands: Sequence[str]) -> None:
    """Append ``commands`` to the commands file at ``path`` once each, without a resumed attempt's ``--ckpt_path``."""
    new = [re.sub(r" --ckpt_path \S+", "", c) for c in commands if c]
    if new:
        lines = path.read_text().splitlines() if path.is_file() else []
        path.write_text("\n".join(dict.fromkeys([*lines, *new])) + "\n")


def accuracy(record: pd.DataFrame) -> pd.DataFrame:
    """One row per method, seed, evaluation and dataset: ``acc``, ``acc_norm`` (empty for generation), ``n``."""
    grouped = record.groupby(KEYS, dropna=False, sort=True)
    out = grouped.agg(acc=("correct", "mean"), acc_norm=("correct_norm", lambda s: s.astype(float).mean()),
                      n=("correct", "size")).reset_index()
    return out.round({"acc": 6, "acc_norm": 6})


def seed_mean(record: pd.DataFrame, method: str, evaluation: str, dataset: str, key: str = "correct",
              seeds: Sequence | None = None) -> tuple[list, np.ndarray | None]:
    """(seeds, per-example ``key`` averaged over them) of a method's evaluation on ``dataset``: all its seeds, or
    those of ``seeds`` it has (None when there are none or the seeds saw different rows)."""
    part = record[(record["method"] == method) & (record["evaluation"] == evaluation) & (record["dataset"] == dataset)]
    found = {(None if pd.isna(s) else int(s)): block.sort_values("index")[key].astype(float).to_numpy()
             for s, block in part.groupby("seed", dropna=False)}
    chosen = sorted(found, key=str) if seeds is None else [s for s in seeds if s in found]
    if not chosen or len({found[s].shape for s in chosen}) != 1 or any(np.isnan(found[s]).any() for s in chosen):
        return chosen, None
    return chosen, np.mean([found[s] for s in chosen], axis=0)


def compare(record: pd.DataFrame, a: str, b: str, evaluation: str, dataset: str, key: str = "correct",
            evaluation_b: str | None = None) -> dict[str, Any] | None:
    """``a`` minus ``b`` per example of ``key``, each averaged over the seeds both have (``zero_shot``: its one
    run pairs with every seed's mean): :func:`~moelora_lit.analysis.stats.paired_examples` plus the seeds."""
    eval_b = evaluation_b or evaluation
    seeds, ya = seed_mean(record, a, evaluation, dataset, key)
    if b != "zero_shot":
        seeds = seed_mean(record, b, eval_b, dataset, key, seeds)[0]
        ya = seed_mean(record, a, evaluation, dataset, key, seeds)[1]
    yb = seed_mean(record, b, eval_b, dataset, key, None if b == "zero_shot" else seeds)[1]
    if ya is None or yb is None or ya.shape != yb.shape:
        return None
    return paired_examples(ya, yb) | {"seeds": [s for s in seeds if s is not None]}


def summarise(record: pd.DataFrame, comparisons: Sequence[tuple[str, str, str | None]]) -> dict[str, Any]:
    """Per method, evaluation and dataset: the seed mean with its t interval, each seed's Wilson interval and the
    interval over examples; then each comparison ``(a, b, evaluation of b or None)`` per evaluation and dataset,
    examples paired (``acc`` and ``acc_norm``) and seeds paired."""
    table = accuracy(record)
    out: dict[str, Any] = {"methods": [], "paired": []}
    for (method, evaluation, dataset), block in table.groupby(["method", "evaluation", "dataset"], sort=True):
        mean, low, high, n = t_interval(block["acc"])
        seeds = [{"seed": None if pd.isna(r.seed) else int(r.seed), "acc": r.acc, "n": int(r.n),
                  "wilson95": list(wilson(round(r.acc * r.n), int(r.n)))} for r in block.itertuples()]
        entry = {"method": method, "evaluation": evaluation, "dataset": dataset, "acc_mean": mean,
                 "t95": [low, high], "seeds": n, "per_seed": seeds, "acc_norm_mean": block["acc_norm"].mean()}
        for key, label in (("correct", "acc"), ("correct_norm", "acc_norm")):
            runs, y = seed_mean(record, method, evaluation, dataset, key)
            if y is not None:
                entry[f"{label}_examples95"] = examples_interval(y, len(runs))
        out["methods"].append(entry)
    for a, b, evaluation_b in comparisons:
        for (evaluation, dataset), block in table.groupby(["evaluation", "dataset"], sort=True):
            example = compare(record, a, b, evaluation, dataset, evaluation_b=evaluation_b)
            if example is None:
                continue
            wide = block.pivot_table(index="seed", columns="method", values="acc")
            both = wide[[a, b]].dropna() if evaluation_b is None and {a, b} <= set(wide) else None
            out["paired"].append({
                "a": a, "b": b, "evaluation": evaluation, "evaluation_b": evaluation_b or evaluation,
                "dataset": dataset, "examples_paired": example,
                "examples_paired_norm": compare(record, a, b, evaluation, dataset, "correct_norm", evaluation_b),
                "seeds_paired": paired_t(both[a], both[b]) if both is not None and len(both) else None})
    return out


def points(low: float, mean: float, high: float, sign: str = "") -> str:
    return f"{100 * mean:{sign}.1f} [{100 * low:{sign}.1f}, {100 * high:{sign}.1f}]"


def markdown(summary: dict[str, Any], sets: dict[str, str],
             tables: Sequence[tuple[Sequence[str], str, str]]) -> str:
    """Tables ``(evaluations, metric, title)``: per method (and evaluation after the first) and test set
    (``sets``: dataset -> column title) the mean over seeds, the 95% interval over examples and the range over
    seeds; then every paired difference."""
    out = []
    for evaluations, metric, title in tables:
        cells: dict[tuple[str, str], str] = {}
        for m in summary["methods"]:
            interval = m.get(f"{metric}_examples95")
            if m["evaluation"] not in evaluations or interval is None:
                continue
            label = m["method"] + ("" if m["evaluation"] == evaluations[0] else f" ({m['evaluation']})")
            values = [s["acc"] for s in m["per_seed"]] if metric == "acc" else None
            cell = points(interval[0], m[f"{metric}_mean"], interval[1])
            if values and len(values) > 1:
                cell += f" ({100 * min(values):.1f}-{100 * max(values):.1f})"
            cells[label, m["dataset"]] = cell
            cells[label, "seeds"] = str(m["seeds"]) if m["method"] != "zero_shot" else "-"
        if cells:
            labels = sorted({k[0] for k in cells}, key=lambda x: (not x.startswith("zero_shot"), x))
            out += [f"### {title}", "", "| method | seeds | " + " | ".join(sets.values()) + " |",
                    "|---" * (2 + len(sets)) + "|"]
            out += [f"| {x} | {cells.get((x, 'seeds'), '')} | " + " | ".join(cells.get((x, d), "-") for d in sets)
                    + " |" for x in labels]
            out.append("")
    out += ["Cells: mean over seeds; 95% interval over the test examples (one run: Wilson; several: t over the "
            "examples of the seed-averaged correctness); for `acc` with several seeds, the lowest and highest seed.",
            "", "### Paired differences (points)", "",
            "| a - b | set | evaluation (of b) | `acc`: diff [95%], examples paired | a / b better | sign p | "
            "`acc_norm` diff [95%] | `acc` diff, seeds paired [95%] |", "|---" * 8 + "|"]
    for row in sorted(summary["paired"], key=lambda r: r["b"] != "zero_shot"):
        e, norm, seeds = row["examples_paired"], row["examples_paired_norm"], row["seeds_paired"]
        where = row["evaluation"] + ("" if row["evaluation_b"] == row["evaluation"] else f" ({row['evaluation_b']})")
        out.append(f"| {row['a']} - {row['b']} | {sets.get(row['dataset'], row['dataset'])} | {where} | "
                   f"{points(e['t95'][0], e['diff'], e['t95'][1], '+')} | {e['a_better']} / {e['b_better']} | "
                   f"{e['sign_test_p']:.2g} | "
                   + (points(norm["t95"][0], norm["diff"], norm["t95"][1], "+") if norm else "-") + " | "
                   + (points(seeds["low"], seeds["diff"], seeds["high"], "+") + f" (n {seeds['n']})"
                      if seeds and seeds["n"] > 1 else "-") + " |")
    return "\n".join(out) + "\n"
