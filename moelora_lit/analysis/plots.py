"""Figures of the ablation: per-seed points, 95% t intervals (never clipped), chance lines, per-layer routing.

Every function takes the tables of :mod:`~moelora_lit.analysis.stats` / :mod:`~moelora_lit.analysis.routing` (or
the frames they are built from), returns the matplotlib figure, and says n in its title.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from moelora_lit.analysis.routing import PROJECTIONS, QUANTITIES, block_grid, paired_layer_difference, per_layer
from moelora_lit.analysis.runs import order
from moelora_lit.analysis.stats import CHANCE, MEAN, REFERENCE, interval_table, paired_table, per_seed
from moelora_lit.lightning.figures import short_layer_name


def _plt() -> Any:
    import matplotlib.pyplot as plt

    return plt


def _limits(ax: Any, values: np.ndarray, pad: float = 0.05) -> None:
    values = values[np.isfinite(values)]
    if len(values):
        lo, hi = float(values.min()), float(values.max())
        span = max(hi - lo, 1e-6)
        ax.set_ylim(lo - pad * span, hi + pad * span)


def plot_accuracy(df: pd.DataFrame, split: str = "test") -> Any:
    """Accuracy per task and for the mean over tasks: one dot per seed, the mean and its 95% t interval per
    method, and the chance line (a random number copied from the question)."""
    plt = _plt()
    seeds, table = per_seed(df, split), interval_table(df, split)
    tasks, methods = list(seeds.columns), order(list(table["method"]))
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(tasks), 4.0))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        x = np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width
        rows = table[table["method"] == method].set_index("task").loc[tasks]
        err = np.abs(rows[["low", "high"]].to_numpy().T - rows["mean"].to_numpy())
        ax.errorbar(x, 100 * rows["mean"], yerr=100 * np.nan_to_num(err), fmt="o", capsize=3, label=method,
                    color=f"C{i}", markersize=6, zorder=3)
        points = seeds.xs(method, level="method")
        for j, task in enumerate(tasks):
            ax.scatter(np.full(len(points), x[j]) + np.linspace(-0.25, 0.25, len(points)) * width,
                       100 * points[task], s=10, color=f"C{i}", alpha=0.45, zorder=2)
    chance = [CHANCE.get(t, np.nan) for t in tasks[:-1]]
    chance.append(float(np.mean(chance)))
    for j, c in enumerate(chance):
        ax.hlines(100 * c, j - 0.45, j + 0.45, colors="k", linestyles=":", linewidth=1,
                  label="chance" if j == 0 else None)
    ax.set_xticks(range(len(tasks)), [t.replace("synth_", "") for t in tasks])
    ax.set_ylabel(f"{split} accuracy (%)")
    _limits(ax, 100 * np.concatenate([table[["low", "high", "mean"]].to_numpy().ravel(), seeds.to_numpy().ravel(),
                                      np.array(chance)]))
    n = table[table["task"] != MEAN].groupby("task")["effective_n"].max()
    ax.set_title(f"{split} accuracy: dots = seeds, bars = 95% t interval over {int(table['seeds'].max())} seeds; "
                 f"n per task {int(n.min())}-{int(n.max())}", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_paired(df: pd.DataFrame, reference: str = REFERENCE, split: str = "test") -> Any:
    """Each method minus ``reference`` per task, paired on seeds: per-seed differences, mean, 95% t interval."""
    plt = _plt()
    seeds, table = per_seed(df, split), paired_table(df, reference, split)
    tasks, methods = list(seeds.columns), order(list(table["method"]))
    ref = seeds.xs(reference, level="method")
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(tasks), 3.8))
    width = 0.8 / max(1, len(methods))
    values = [0.0]
    for i, method in enumerate(methods):
        x = np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width
        rows = table[table["method"] == method].set_index("task").loc[tasks]
        err = np.abs(rows[["low", "high"]].to_numpy().T - rows["diff"].to_numpy())
        ax.errorbar(x, 100 * rows["diff"], yerr=100 * np.nan_to_num(err), fmt="o", capsize=3, label=method,
                    color=f"C{i}")
        mine = seeds.xs(method, level="method")
        common = sorted(set(mine.index) & set(ref.index))
        for j, task in enumerate(tasks):
            d = 100 * (mine.loc[common, task] - ref.loc[common, task])
            ax.scatter(np.full(len(d), x[j]), d, s=10, color=f"C{i}", alpha=0.45)
            values += list(d)
        values += list(100 * rows[["low", "high"]].to_numpy().ravel())
    ax.axhline(0, color="k", linewidth=1)
    ax.set_xticks(range(len(tasks)), [t.replace("synth_", "") for t in tasks])
    ax.set_ylabel(f"minus {reference} (points)")
    _limits(ax, np.array(values, dtype=float))
    ax.set_title(f"paired difference to {reference} ({int(table['n'].max())} seeds): dots = seeds, bars = 95% t "
                 "interval", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_sweep(sweep: pd.DataFrame, chosen: Mapping[str, Mapping[str, float]] | None = None) -> Any:
    """Mean validation accuracy over tasks against the learning rate, per method; the chosen rate circled."""
    plt = _plt()
    val = sweep[sweep["split"] == "validation"] if "split" in sweep else sweep
    scores = val.groupby(["method", "lr"])["accuracy"].mean().reset_index()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, method in enumerate(order(list(scores["method"]))):
        part = scores[scores["method"] == method].sort_values("lr")
        ax.plot(part["lr"], 100 * part["accuracy"], marker="o", color=f"C{i}", label=method)
        if chosen and method in chosen:
            best = part[np.isclose(part["lr"], chosen[method]["lr"])]
            ax.scatter(best["lr"], 100 * best["accuracy"], s=140, facecolors="none", edgecolors=f"C{i}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation accuracy, mean over tasks (%)")
    ax.set_title(f"sweep: one seed per point, {int(val.groupby('task')['n'].max().sum())} validation rows", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_layer_difference(summaries: Mapping[tuple[str, int], Any], a: str = REFERENCE,
                          b: str = "moelora_no_contrastive", key: str = "entropy") -> Any:
    """Per layer, ``a`` minus ``b`` of a routing quantity (default the gate entropy) after training and at step 0:
    per-seed differences, mean and 95% t interval over seeds."""
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(11, 5.2), sharex=True)
    for ax, state in zip(axes, ("trained", "step0"), strict=True):
        diff = paired_layer_difference(summaries, a, b, key, state)
        x = np.arange(len(diff))
        err = np.abs(diff[["low", "high"]].to_numpy().T - diff["diff"].to_numpy())
        ax.errorbar(x, diff["diff"], yerr=np.nan_to_num(err), fmt="o", capsize=2, color="C0")
        long = per_layer(summaries, key)
        long = long[long["state"] == state].pivot_table(index=["layer", "seed"], columns="method", values="value")
        for i, layer in enumerate(diff["layer"]):
            d = (long.loc[layer][a] - long.loc[layer][b]).dropna()
            ax.scatter(np.full(len(d), i), d, s=8, color="C0", alpha=0.4)
        ax.axhline(0, color="k", linewidth=1)
        ax.set_ylabel(f"{key} difference")
        ax.set_title(f"{state}: {a} minus {b}, per layer ({int(diff['n'].max())} seeds, 95% t interval)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(x, [short_layer_name(n) for n in diff["layer"]], rotation=90, fontsize=7)
    fig.tight_layout()
    return fig


def plot_specialisation(summaries: Mapping[tuple[str, int], Any]) -> Any:
    """Per layer and method: task specialisation (JS divergence, bits) after training and at step 0, against the
    task-label permutation null; filled markers where the permutation p-value is below 0.05."""
    plt = _plt()
    spec, pvals, null = (per_layer(summaries, k) for k in ("specialisation", "p", "null_mean"))
    methods = order(list(spec["method"]))
    fig, axes = plt.subplots(len(methods), 1, figsize=(11, 2.4 * len(methods)), sharex=True, squeeze=False)
    layers = list(dict.fromkeys(spec["layer"]))
    x = np.arange(len(layers))
    for ax, method in zip(axes[:, 0], methods, strict=True):
        for state, color in (("trained", "C0"), ("step0", "C7")):
            sel = (spec["method"] == method) & (spec["state"] == state)
            s, p, n0 = spec[sel], pvals[sel], null[sel]
            for seed in sorted(set(s["seed"])):
                v = s[s["seed"] == seed].set_index("layer").loc[layers, "value"].to_numpy()
                sig = p[p["seed"] == seed].set_index("layer").loc[layers, "value"].to_numpy() < 0.05
                ax.scatter(x[sig], v[sig], s=12, color=color)
                ax.scatter(x[~sig], v[~sig], s=12, facecolors="none", edgecolors=color)
            ax.plot(x, s.groupby("layer")["value"].mean().loc[layers], color=color, label=state)
            ax.plot(x, n0.groupby("layer")["value"].mean().loc[layers], color=color, linestyle=":",
                    label=f"{state} permutation null")
        ax.set_yscale("log")
        ax.set_ylabel("JS (bits)")
        ax.set_title(f"{method}: specialisation per layer, {len(set(s['seed']))} seeds (filled: p < 0.05)", fontsize=9)
        ax.legend(fontsize=7, ncol=4)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xticks(x, [short_layer_name(n) for n in layers], rotation=90, fontsize=7)
    fig.tight_layout()
    return fig


def plot_expert_use(summary: Mapping[str, Any], title: str = "", state: str = "trained") -> Any:
    """Layer x expert use per task (one panel per task) and its deviation from the layer's mean over tasks."""
    plt = _plt()
    use = {t: np.asarray(v) for t, v in summary[state]["use"].items()}
    overall = np.mean(list(use.values()), axis=0)
    dev = max(float(np.abs(u - overall).max()) for u in use.values())
    fig, axes = plt.subplots(2, len(use), figsize=(2.6 * len(use) + 1, 9), squeeze=False, layout="constrained")
    names = [short_layer_name(n) for n in summary["layers"]]
    vmax = float(max(v.max() for v in use.values()))
    for j, (task, u) in enumerate(use.items()):
        top = axes[0, j].imshow(u, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        bottom = axes[1, j].imshow(u - overall, aspect="auto", cmap="RdBu_r", vmin=-dev, vmax=dev)
        axes[0, j].set_title(task.replace("synth_", ""), fontsize=9)
        for row in (0, 1):
            axes[row, j].set_yticks(range(len(names)), names if j == 0 else [], fontsize=6)
            axes[row, j].set_xlabel("expert", fontsize=8)
    fig.colorbar(top, ax=axes[0], shrink=0.8, label="load share")
    fig.colorbar(bottom, ax=axes[1], shrink=0.8, label="minus the layer's mean over tasks")
    fig.suptitle(f"{title} ({state}): expert use per layer, {summary[state]['examples']} test rows", fontsize=10)
    return fig


def plot_layer_grid(diffs: pd.DataFrame, title: str = "") -> Any:
    """Per quantity (rows: specialisation, entropy) and comparison (columns) of :func:`routing.differences`, a
    (block x projection) heatmap of the seed-mean difference on one colour scale per row; a dot marks the layers whose
    95% t interval over seeds excludes 0."""
    plt = _plt()

    comparisons = list(dict.fromkeys(diffs["comparison"]))
    fig, axes = plt.subplots(2, len(comparisons), figsize=(3.4 * len(comparisons) + 1, 9), squeeze=False,
                             layout="constrained")
    units = {"specialisation": "task specialisation, JS bits", "entropy": "gate entropy, nats"}
    for i, quantity in enumerate(QUANTITIES):
        limit = float(np.nanmax(np.abs(diffs.loc[diffs["quantity"] == quantity, "diff"]))) or 1.0  # one scale a row
        for j, comparison in enumerate(comparisons):
            table = diffs[(diffs["quantity"] == quantity) & (diffs["comparison"] == comparison)]
            ax = axes[i, j]
            if table.empty:
                ax.axis("off")
                continue
            values, low, high = block_grid(table), block_grid(table, "low"), block_grid(table, "high")
            image = ax.imshow(values.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
            ys, xs = np.nonzero(((low > 0) | (high < 0)).to_numpy())
            ax.scatter(xs, ys, s=6, color="k")
            ax.set_xticks(range(len(PROJECTIONS)), [p.replace("_proj", "") for p in PROJECTIONS], fontsize=7)
            ax.set_yticks(range(0, len(values), 5), values.index[::5], fontsize=7)
            ax.set_ylabel("block" if j == 0 else "")
            ax.set_title(f"{units[quantity]}\n{comparison}\n({int(table['n'].max())} seeds)", fontsize=8)
            fig.colorbar(image, ax=ax, shrink=0.7)
    fig.suptitle(f"{title}\n(seed means; dot: the layer's 95% t interval over seeds excludes 0)", fontsize=9)
    return fig
