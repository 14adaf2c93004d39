"""Routing of the SmolLM2 common-sense study on a (transformer block x projection) grid, from committed files.

    python scripts/smollm2_routing.py [--folder experiments/results/smollm2_commonsense_routing]

Reads the ``<method>_seed<S>.json`` probe summaries (:class:`moelora_lit.analysis.probe.RoutingProbe`: 60 held-out
validation rows per task, routed at step 0 and after training) that ``scripts/smollm2_study.py table`` copies there,
and writes beside them:

- ``routing.png``: top row, task specialisation (mean JS divergence between the three tasks' expert use, bits)
  after training minus at step 0, per method, and MoELoRA minus MoELoRA without the contrastive loss after
  training; bottom row, the same for the gate entropy (nats). Seed means; a dot marks cells whose 95% t interval
  over seeds excludes 0.
- ``routing_layers.csv``: per layer, method and quantity, the seed-paired difference, interval and p-value.
- ``routing_summary.csv``: the same averaged over the 30 blocks per projection and over all 210 layers, each with
  a 95% t interval over seeds (each seed's layer mean, paired).

The step-0 router (untrained, on the base model's hidden states) is the null for "routing separates the tasks";
the task-label permutation p-values of each state are in the summaries (``moelora_lit.analysis.routing``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moelora_lit.analysis.routing import load_summaries, per_layer
from moelora_lit.analysis.stats import paired_t
from moelora_lit.lightning.figures import short_layer_name

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
A, B = "moelora", "moelora_no_contrastive"


QUANTITIES = ("specialisation", "entropy")


def seed_values(summaries: Mapping[tuple[str, int], Any], quantity: str) -> pd.DataFrame:
    """Per (layer, seed), in the model's layer order, each comparison's difference: per method trained minus step 0,
    and MoELoRA minus MoELoRA without the contrastive loss after training (one column each)."""
    long = per_layer(summaries, quantity)
    wide = long.pivot_table(index=["layer", "seed"], columns=["method", "state"], values="value")
    wide = wide.reindex(list(dict.fromkeys(long["layer"])), level="layer")
    out = pd.DataFrame(index=wide.index)
    for method in sorted(set(long["method"])):
        if (method, "trained") in wide:
            out[f"{method}: trained - step0"] = wide[(method, "trained")] - wide[(method, "step0")]
    if (A, "trained") in wide and (B, "trained") in wide:
        out[f"{A} - {B} (trained)"] = wide[(A, "trained")] - wide[(B, "trained")]
    return out


def zero_test(values: pd.Series) -> dict[str, float]:
    """Mean of the per-seed ``values`` with its 95% t interval and the p-value of a zero mean."""
    values = values.dropna()
    return paired_t(values, np.zeros(len(values)))


def differences(summaries: Mapping[tuple[str, int], Any]) -> pd.DataFrame:
    """Long table ``quantity, comparison, layer, diff, low, high, p, n``: each comparison of :func:`seed_values`
    per layer, paired over seeds."""
    rows = []
    for quantity in QUANTITIES:
        values = seed_values(summaries, quantity)
        for layer, block in values.groupby(level="layer", sort=False):
            rows += [{"quantity": quantity, "comparison": comparison, "layer": layer} | zero_test(block[comparison])
                     for comparison in values.columns]
    return pd.DataFrame(rows)


def grid(table: pd.DataFrame, value: str = "diff") -> pd.DataFrame:
    """(blocks x projections) of one comparison's per-layer ``value``; layers are ``model.layers.<b>.*.<proj>``."""
    names = table["layer"].map(short_layer_name).str.removeprefix("L").str.split(" ", n=1, expand=True)  # "L3 q_proj"
    out = pd.DataFrame({"block": names[0].astype(int), "proj": names[1], value: table[value].to_numpy()})
    return out.pivot(index="block", columns="proj", values=value).reindex(columns=PROJECTIONS)


def summary(diffs: pd.DataFrame, summaries: Mapping[tuple[str, int], Any]) -> pd.DataFrame:
    """Per comparison, quantity and projection (and ``all`` 210 layers): the difference averaged over the layers,
    with its 95% t interval and p over seeds (each seed's layer mean, paired), and how many layers' own intervals
    exclude 0 in each direction (about 5% of them would by chance)."""
    rows = []
    diffs = diffs.assign(proj=diffs["layer"].map(lambda n: n.rsplit(".", 1)[-1]))
    for quantity in QUANTITIES:
        values = seed_values(summaries, quantity).reset_index()
        values["proj"] = values["layer"].map(lambda n: n.rsplit(".", 1)[-1])
        for comparison in values.columns.drop(["layer", "seed", "proj"]):
            block = diffs[(diffs["quantity"] == quantity) & (diffs["comparison"] == comparison)]
            for proj in [*PROJECTIONS, "all"]:
                part = block if proj == "all" else block[block["proj"] == proj]
                chosen = values if proj == "all" else values[values["proj"] == proj]
                test = zero_test(chosen.groupby("seed")[comparison].mean())
                rows.append({"quantity": quantity, "comparison": comparison, "projection": proj,
                             "layers": len(part), "mean_diff": test["diff"], "low": test["low"],
                             "high": test["high"], "p": test["p"], "seeds": test["n"],
                             "layers_up": int((part["low"] > 0).sum()), "layers_down": int((part["high"] < 0).sum())})
    return pd.DataFrame(rows)


def plot(diffs: pd.DataFrame) -> Any:
    """The 2 x (methods + 1) heatmap figure described in the module docstring."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            values, low, high = grid(table), grid(table, "low"), grid(table, "high")
            image = ax.imshow(values.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
            ys, xs = np.nonzero(((low > 0) | (high < 0)).to_numpy())
            ax.scatter(xs, ys, s=6, color="k")
            ax.set_xticks(range(len(PROJECTIONS)), [p.replace("_proj", "") for p in PROJECTIONS], fontsize=7)
            ax.set_yticks(range(0, len(values), 5), values.index[::5], fontsize=7)
            ax.set_ylabel("block" if j == 0 else "")
            ax.set_title(f"{units[quantity]}\n{comparison}\n({int(table['n'].max())} seeds)", fontsize=8)
            fig.colorbar(image, ax=ax, shrink=0.7)
    fig.suptitle("SmolLM2-135M, ARC-E + BoolQ + OBQA: routing of held-out rows\n"
                 "(seed means; dot: the layer's 95% t interval over seeds excludes 0)", fontsize=9)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--folder", type=Path, default=root / "experiments" / "results" / "smollm2_commonsense_routing")
    args = parser.parse_args(argv)
    summaries = load_summaries(args.folder)
    if not summaries:
        print(f"no <method>_seed<S>.json in {args.folder}; run scripts/smollm2_study.py table first")
        return 2
    diffs = differences(summaries)
    diffs.to_csv(args.folder / "routing_layers.csv", index=False)
    table = summary(diffs, summaries)
    table.to_csv(args.folder / "routing_summary.csv", index=False)
    plot(diffs).savefig(args.folder / "routing.png", dpi=120)
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(table[table["projection"] == "all"].to_string(index=False))
    print(f"wrote routing.png, routing_layers.csv, routing_summary.csv to {args.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
