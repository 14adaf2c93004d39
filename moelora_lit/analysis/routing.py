"""Routing analysis against proper nulls, per layer (numpy only).

Inputs are per-example expert loads: ``loads[e, l, i]`` is example e's mean gate on expert i at layer l over its
tokens, from :class:`moelora_lit.lightning.probe.RoutingProbe`, which measures the same held-out rows twice: with
the router at step 0 (untrained; the adapters are still the identity) and after training.

- **Specialisation** of layer l: the mean over task pairs of the Jensen-Shannon divergence (bits) between the
  tasks' mean expert-use distributions. Any input-dependent router scores above 0 on any split of inputs, so the
  score alone says little; two nulls: the **same router at step 0**, and a **task-label permutation test** (labels
  shuffled over examples, the same shuffle for every layer) whose p-value says whether tasks route more
  differently than random groups of the same examples.
- **Routing entropy** per layer: the mean over tokens of the gate entropy (nats); the paper's claim is that the
  contrastive loss lowers it ("reduces random routing").

Expert indices mean nothing across layers, so nothing here averages an expert over layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moelora_lit.analysis.stats import paired_t
from moelora_lit.lightning.figures import short_layer_name
from moelora_lit.lightning.probe import (  # noqa: F401 (re-exported)
    js_divergence,
    permutation_test,
    specialisation,
    summarise,
    task_means,
)


# ------------------------------------------------------------------------------------------------ reading
def load_summaries(folder: str | os.PathLike) -> dict[tuple[str, int], dict[str, Any]]:
    """``{(method, seed): summary}`` from the ``<method>_seed<S>.json`` files of :func:`write_summary`."""
    out = {}
    for path in sorted(Path(folder).glob("*_seed*.json")):
        method, seed = path.stem.rsplit("_seed", 1)
        out[(method, int(seed))] = json.loads(path.read_text())
    return out


def specialisation_table(summaries: Mapping[tuple[str, int], Mapping[str, Any]]) -> pd.DataFrame:
    """One row per method, seed and state (``step0`` | ``trained``): the layer-mean specialisation, its
    permutation null and p-value, and how many layers reach p < 0.05."""
    rows = []
    for (method, seed), s in summaries.items():
        for state in ("step0", "trained"):
            r = s[state]
            rows.append({"method": method, "seed": seed, "state": state, "specialisation": r["mean_specialisation"],
                         "null": r["mean_null"], "p": r["mean_p"],
                         "layers_p05": int(sum(p < 0.05 for p in r["p"])), "layers": len(r["p"])})
    return pd.DataFrame(rows)


def per_layer(summaries: Mapping[tuple[str, int], Mapping[str, Any]], key: str) -> pd.DataFrame:
    """Long table ``method, seed, state, layer, value`` of a per-layer list (``specialisation``, ``p``,
    ``entropy``, ``null_mean``)."""
    rows = [{"method": m, "seed": seed, "state": state, "layer": layer, "value": v}
            for (m, seed), s in summaries.items() for state in ("step0", "trained")
            for layer, v in zip(s["layers"], s[state][key], strict=True)]
    return pd.DataFrame(rows)


def paired_layer_difference(summaries: Mapping[tuple[str, int], Mapping[str, Any]], a: str, b: str,
                            key: str = "entropy", state: str = "trained") -> pd.DataFrame:
    """Per layer, method ``a`` minus method ``b`` of a per-layer quantity, paired over the seeds both ran: the mean
    difference, its 95% t interval and the paired t-test's p-value."""
    table = per_layer(summaries, key)
    table = table[table["state"] == state].pivot_table(index=["layer", "seed"], columns="method", values="value")
    layers = list(dict.fromkeys(next(iter(summaries.values()))["layers"]))
    rows = []
    for layer in layers:
        pairs = table.loc[layer][[a, b]].dropna()
        rows.append({"layer": layer} | paired_t(pairs[a], pairs[b]))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------- per (block x projection) layer grid
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


QUANTITIES = ("specialisation", "entropy")


def seed_values(summaries: Mapping[tuple[str, int], Any], quantity: str, a: str = "moelora",
                b: str = "moelora_no_contrastive") -> pd.DataFrame:
    """Per (layer, seed), in the model's layer order, each comparison's difference: per method trained minus step 0,
    and ``a`` minus ``b`` after training (one column each)."""
    long = per_layer(summaries, quantity)
    wide = long.pivot_table(index=["layer", "seed"], columns=["method", "state"], values="value")
    wide = wide.reindex(list(dict.fromkeys(long["layer"])), level="layer")
    out = pd.DataFrame(index=wide.index)
    for method in sorted(set(long["method"])):
        if (method, "trained") in wide:
            out[f"{method}: trained - step0"] = wide[(method, "trained")] - wide[(method, "step0")]
    if (a, "trained") in wide and (b, "trained") in wide:
        out[f"{a} - {b} (trained)"] = wide[(a, "trained")] - wide[(b, "trained")]
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


def block_grid(table: pd.DataFrame, value: str = "diff") -> pd.DataFrame:
    """(blocks x projections) of one comparison's per-layer ``value``; layers are ``model.layers.<b>.*.<proj>``."""
    names = table["layer"].map(short_layer_name).str.removeprefix("L").str.split(" ", n=1, expand=True)  # "L3 q_proj"
    out = pd.DataFrame({"block": names[0].astype(int), "proj": names[1], value: table[value].to_numpy()})
    return out.pivot(index="block", columns="proj", values=value).reindex(columns=PROJECTIONS)


def layer_summary(diffs: pd.DataFrame, summaries: Mapping[tuple[str, int], Any]) -> pd.DataFrame:
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
