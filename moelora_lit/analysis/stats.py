"""Statistics of the studies: t intervals over seeds, paired differences and tests as tables (the t numbers come
from :mod:`moelora_lit.eval.stats`), and per-example statistics (Wilson intervals, exact sign / McNemar tests) from
scipy.

Seeds are the unit of replication: a method's accuracy on a task is one number per seed (the share of that task's
test rows answered right), the same seeds run for every method, so methods are compared as pairs per seed. The
``mean`` over tasks is each seed's mean over the tasks, then treated like a task.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from moelora_lit.eval.stats import betainc, paired_t, t_critical, t_interval, t_quantile, t_sf2

__all__ = [
    "CHANCE", "MEAN", "REFERENCE", "betainc", "examples_interval", "format_interval", "interval_table",
    "paired_examples", "paired_t", "paired_table", "per_seed", "shared_seeds", "sign_test", "t_critical",
    "t_interval", "t_quantile", "t_sf2", "verdicts", "wide", "wilson",
]  # fmt: skip

MEAN = "mean"
REFERENCE = "moelora"
# Accuracy of answering with a random number copied from the question: 1 of 3 counts, 1 of 2 numbers, and never
# right for the sums and products (the answer is not in the question). Drawn as the chance line.
CHANCE = {"synth_lookup": 1 / 3, "synth_add": 0.0, "synth_units": 0.0, "synth_compare": 1 / 2}


def shared_seeds(df: pd.DataFrame) -> list[int]:
    """The seeds every method in ``df`` has (an ablation cut short may have more seeds for some methods)."""
    sets = [set(block["seed"]) for _, block in df.groupby("method")]
    return sorted(set.intersection(*sets)) if sets else []


def per_seed(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Accuracy per (method, seed) x task for one split, plus the column :data:`MEAN` (mean over tasks); only the
    seeds every method has, so that all methods are compared on the same seeds."""
    part = df[df["split"] == split] if "split" in df.columns else df
    part = part[part["seed"].isin(shared_seeds(part))]
    tasks = list(dict.fromkeys(part["task"]))
    table = part.pivot_table(index=["method", "seed"], columns="task", values="accuracy", aggfunc="mean")[tasks]
    table[MEAN] = table.mean(axis=1)
    return table


def interval_table(df: pd.DataFrame, split: str = "test", level: float = 0.95) -> pd.DataFrame:
    """One row per method x task (and :data:`MEAN`): mean accuracy over seeds, its t interval, seeds, and the
    rows per seed behind each accuracy (``n``) and how many distinct computations they are (``effective_n``)."""
    table = per_seed(df, split)
    part = df[df["split"] == split] if "split" in df.columns else df
    sizes = part.groupby("task")[["n", "effective_n"] if "effective_n" in part else ["n"]].max()
    rows = []
    for method, block in table.groupby(level="method", sort=False):
        for task in table.columns:
            mean, lo, hi, seeds = t_interval(block[task].dropna(), level)
            size = sizes.sum() if task == MEAN else sizes.loc[task]
            rows.append({"method": method, "task": task, "mean": mean, "low": lo, "high": hi, "seeds": seeds,
                         "n": int(size["n"]), "effective_n": int(size.get("effective_n", size["n"]))})
    return pd.DataFrame(rows)


def paired_table(df: pd.DataFrame, reference: str = REFERENCE, split: str = "test",
                 level: float = 0.95) -> pd.DataFrame:
    """Each method minus ``reference`` per task and for :data:`MEAN`, paired on the seeds both ran: the mean
    difference, its t interval, t, the paired t-test's p-value and the number of pairs."""
    table = per_seed(df, split)
    if reference not in table.index.get_level_values("method"):
        raise ValueError(f"reference method {reference!r} not in the results")
    ref = table.xs(reference, level="method")
    rows = []
    for method, block in table.groupby(level="method", sort=False):
        if method == reference:
            continue
        mine = block.droplevel("method")
        seeds = sorted(set(mine.index) & set(ref.index))
        for task in table.columns:
            rows.append({"method": method, "task": task} | paired_t(mine.loc[seeds, task], ref.loc[seeds, task], level))
    return pd.DataFrame(rows)


def format_interval(mean: float, low: float, high: float, scale: float = 100.0, digits: int = 1) -> str:
    """``"37.5 [30.1, 44.9]"`` (in percent by default); the bare mean when there is no interval."""
    if np.isnan(low):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def wide(table: pd.DataFrame, value: str = "interval") -> pd.DataFrame:
    """:func:`interval_table` or :func:`paired_table` as methods x tasks of formatted strings."""
    cols = ("mean", "low", "high") if "mean" in table.columns else ("diff", "low", "high")
    out = table.assign(interval=[format_interval(*r) for r in table[list(cols)].itertuples(index=False)])
    if "p" in out.columns:
        out["interval"] = [f"{s} p={p:.3f}" for s, p in zip(out["interval"], out["p"], strict=True)]
    return out.pivot(index="method", columns="task", values=value).loc[list(dict.fromkeys(out["method"]))][
        list(dict.fromkeys(out["task"]))]


def verdicts(df: pd.DataFrame, reference: str = REFERENCE, split: str = "test") -> str:
    """Plain sentences computed from the data: each method's mean accuracy over tasks with its interval, and its
    paired difference to ``reference`` with interval, p-value and whether the interval excludes zero."""
    acc = interval_table(df, split).set_index(["method", "task"])
    seeds = int(acc["seeds"].max())
    n = int(acc.xs(MEAN, level="task")["effective_n"].max())
    lines = [f"{split} accuracy, mean over tasks, {seeds} seeds, {n} distinct {split} computations per seed "
             "(95% t intervals over seeds, in points):"]
    for method, row in acc.xs(MEAN, level="task").iterrows():
        lines.append(f"- {method}: {format_interval(row['mean'], row['low'], row['high'])}")
    if reference in acc.index.get_level_values("method"):
        lines.append(f"Paired difference to {reference} (same seeds), mean over tasks:")
        for _, r in paired_table(df, reference, split).query("task == @MEAN").iterrows():
            where = "above" if r["low"] > 0 else "below" if r["high"] < 0 else "not distinguishable from"
            lines.append(f"- {r['method']} minus {reference}: {format_interval(r['diff'], r['low'], r['high'])}, "
                         f"paired t-test p = {r['p']:.3g} ({r['method']} {where} {reference} at this n)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- per example
def wilson(correct: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of ``correct`` successes in ``n`` rows (scipy)."""
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p of ``wins`` against ``losses`` (the rows where two methods differ): the sign test
    of paired per-example differences, which for 0/1 correctness is the exact McNemar test."""
    return float(binomtest(int(wins), int(wins + losses)).pvalue) if wins + losses else 1.0


def examples_interval(y: np.ndarray, runs: int, level: float = 0.95) -> list[float]:
    """Interval of the mean of per-example correctness ``y`` (averaged over ``runs`` seeds): Wilson for one run or
    when every example agrees (a t interval would have width 0), else t over the examples."""
    mean, low, high, n = t_interval(y, level)
    if runs == 1 or not high > low:
        return list(wilson(round(mean * n), n, level))
    return [low, high]


def paired_examples(ya: np.ndarray, yb: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """``ya - yb`` per example: mean with its t interval over examples, and the sign test of the examples where the
    two differ (``a_better`` / ``b_better``)."""
    diff = np.asarray(ya, dtype=float) - np.asarray(yb, dtype=float)
    mean, low, high, n = t_interval(diff, level)
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    return {"diff": mean, "t95": [low, high], "n": n, "a_better": wins, "b_better": losses,
            "sign_test_p": sign_test(wins, losses)}
