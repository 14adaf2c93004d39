"""Routing analysis against proper nulls, per layer (numpy only).

Inputs are per-example expert loads: ``loads[e, l, i]`` is example e's mean gate on expert i at layer l over its
tokens, from :class:`moelora_lit.analysis.probe.RoutingProbe`, which measures the same held-out rows twice: with
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
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moelora_lit.analysis.stats import paired_t


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits along the last axis (0 for equal, 1 for disjoint distributions)."""
    p = np.asarray(p, dtype=float) / np.asarray(p, dtype=float).sum(-1, keepdims=True)
    q = np.asarray(q, dtype=float) / np.asarray(q, dtype=float).sum(-1, keepdims=True)
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / b), 0.0).sum(-1)

    return (kl(p, m) + kl(q, m)) / 2


def task_means(loads: np.ndarray, labels: np.ndarray, n_tasks: int) -> np.ndarray:
    """(tasks, layers, N) mean loads per task from (examples, layers, N) ``loads`` and integer ``labels``."""
    onehot = np.eye(n_tasks)[labels]                                                  # (E, K)
    return np.einsum("ek,eln->kln", onehot, loads) / onehot.sum(0)[:, None, None]


def specialisation(means: np.ndarray) -> np.ndarray:
    """Per layer, the mean over task pairs of the JS divergence between tasks' expert use; ``means`` is
    (..., tasks, layers, N), the result (..., layers)."""
    pairs = list(combinations(range(means.shape[-3]), 2))
    return np.mean([js_divergence(means[..., a, :, :], means[..., b, :, :]) for a, b in pairs], axis=0)


def permutation_test(loads: np.ndarray, labels: Sequence[int], permutations: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Specialisation per layer and for the layer mean, against task labels shuffled over the examples.

    Returns ``specialisation`` (layers,), ``null_mean`` (layers,), ``p`` (layers,) and the same for the layer mean
    (``mean_specialisation``, ``mean_null``, ``mean_p``); p = (1 + #{null >= observed}) / (1 + permutations).
    """
    loads, labels = np.asarray(loads, dtype=float), np.asarray(labels)
    n_tasks = int(labels.max()) + 1
    observed = specialisation(task_means(loads, labels, n_tasks))                     # (L,)
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(labels) for _ in range(permutations)])       # (P, E)
    onehot = np.eye(n_tasks)[shuffled]                                                # (P, E, K)
    means = np.einsum("pek,eln->pkln", onehot, loads) / onehot.sum(1)[:, :, None, None]
    null = specialisation(means)                                                      # (P, L)
    p = (1 + (null >= observed - 1e-12).sum(0)) / (1 + permutations)
    mean_null = null.mean(1)
    mean_p = (1 + (mean_null >= observed.mean() - 1e-12).sum()) / (1 + permutations)
    return {"specialisation": observed.tolist(), "null_mean": null.mean(0).tolist(), "p": p.tolist(),
            "mean_specialisation": float(observed.mean()), "mean_null": float(mean_null.mean()),
            "mean_p": float(mean_p)}


def summarise(loads: np.ndarray, labels: Sequence[int], tasks: Sequence[str], entropy: np.ndarray,
              permutations: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The per-run summary of one routing state: the permutation test, per-layer entropy, and per task the
    (layers, N) expert use, rounded for a small JSON file."""
    test = permutation_test(loads, labels, permutations, seed)
    means = task_means(np.asarray(loads, dtype=float), np.asarray(labels), len(tasks))
    rounded = {k: (np.round(v, 5).tolist() if isinstance(v, list) else round(v, 6)) for k, v in test.items()}
    return rounded | {"entropy": np.round(np.asarray(entropy, dtype=float), 5).tolist(),
                      "use": {t: np.round(means[i], 4).tolist() for i, t in enumerate(tasks)},
                      "examples": int(len(labels))}


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
