"""Routing of the SmolLM2-135M methods study's arms against their untrained routers and the permutation null, by arm
and by depth (``driver.py routing``)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from methods_protocol import METHODS, OLD_RESULTS, RESULTS

from moelora_lit.analysis import routing
from moelora_lit.analysis.stats import paired_t


def load_probes(results: Path = RESULTS, old: Path = OLD_RESULTS) -> dict[tuple[str, int], dict]:
    probes = routing.load_summaries(old / "routing") | routing.load_summaries(results / "routing")
    return {k: v for k, v in probes.items() if k[0] in METHODS}


def block_of(layer: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", layer).group(1))


def routing_tables(probes: dict[tuple[str, int], dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per arm: layer-mean specialisation at step 0 and trained, the permutation null, and trained minus step 0
    paired over seeds; per arm and block: trained minus step 0 and step 0 minus its null, means over seeds)."""
    spec = routing.specialisation_table(probes)
    rows = []
    for method in [m for m in METHODS if m in set(spec["method"])]:
        part = spec[spec["method"] == method].pivot_table(index="seed", columns="state",
                                                          values=["specialisation", "null", "p", "layers_p05"])
        gain = paired_t(part[("specialisation", "trained")], part[("specialisation", "step0")])
        over_null = paired_t(part[("specialisation", "step0")], part[("null", "step0")])
        layers = len(next(v for k, v in probes.items() if k[0] == method)["layers"])
        rows.append({"method": method, "seeds": len(part), "routed_layers": layers,
                     "step0": part[("specialisation", "step0")].mean(), "step0_null": part[("null", "step0")].mean(),
                     "step0_minus_null": over_null["diff"], "step0_minus_null_low": over_null["low"],
                     "step0_minus_null_high": over_null["high"],
                     "step0_layers_p05": part[("layers_p05", "step0")].mean(),
                     "trained": part[("specialisation", "trained")].mean(),
                     "trained_null": part[("null", "trained")].mean(),
                     "trained_layers_p05": part[("layers_p05", "trained")].mean(),
                     "gain": gain["diff"], "gain_low": gain["low"], "gain_high": gain["high"], "gain_p": gain["p"]})
    depth = []
    for (method, seed), s in probes.items():
        for layer, a, b, null in zip(s["layers"], s["trained"]["specialisation"], s["step0"]["specialisation"],
                                     s["step0"]["null_mean"], strict=True):
            depth.append({"method": method, "seed": seed, "block": block_of(layer), "gain": a - b,
                          "step0_over_null": b - null})
    depth = pd.DataFrame(depth, columns=["method", "seed", "block", "gain", "step0_over_null"])
    depth = depth.groupby(["method", "block", "seed"]).mean().groupby(["method", "block"]).agg(
        gain=("gain", "mean"), step0_over_null=("step0_over_null", "mean"), seeds=("gain", "size")).reset_index()
    return pd.DataFrame(rows), depth


def write_routing(results: Path = RESULTS, out: Path | None = None, figure: bool = True,
                  old: Path = OLD_RESULTS) -> None:
    """Per arm, routing against its untrained router and the permutation null (``routing_arms.csv``), per arm and
    block (``routing_depth.csv``) and the figure of arms by depth (``routing_depth.png``)."""
    out = out or results / "routing"
    out.mkdir(parents=True, exist_ok=True)
    probes = load_probes(results, old)
    arms_table, depth = routing_tables(probes)
    arms_table.to_csv(out / "routing_arms.csv", index=False, float_format="%.6g")
    depth.to_csv(out / "routing_depth.csv", index=False, float_format="%.6g")
    if figure and len(depth):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
        for method, block in depth.groupby("method", sort=False):
            n = int(block["seeds"].max())
            axes[0].plot(block["block"], block["gain"], marker=".", label=f"{method} (seeds {n})")
            axes[1].plot(block["block"], block["step0_over_null"], marker=".", label=method)
        axes[0].axhline(0, color="grey", lw=0.8)
        axes[1].axhline(0, color="grey", lw=0.8)
        axes[0].set(title="trained minus step 0 (task specialisation, bits)", xlabel="block", ylabel="JS bits")
        axes[1].set(title="step 0 minus its permutation null", xlabel="block")
        axes[0].legend(fontsize=7)
        fig.suptitle("SmolLM2-135M methods study: routing of held-out rows by depth (mean over a block's routed "
                     "layers and seeds)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "routing_depth.png", dpi=110)
    print(f"wrote routing_arms.csv, routing_depth.csv{', routing_depth.png' if figure else ''} to {out}")
