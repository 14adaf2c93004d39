"""``python -m moelora_lit report RUN_DIR... [--csv FILE] [--out FILE.md]``: a dataset x method table of test accuracy.

Every ``test_results.json`` under the given folders is one run; its method and seed come from a ``run.json`` beside
it or in a folder above it (written by ``scripts/sweep.py``: ``{"method": ..., "seed": ...}``), else from the
``config.yaml`` LightningCLI saved beside it (``seed_everything``; the method named after the adapter). Each cell
is the mean over seeds with a 95% Student-t interval, in %; published numbers (:mod:`moelora_lit.eval.published`) sit in
their own columns. The footer lists each method's evaluation protocol and decoding, and flags the math test sets
that math_10k contaminates.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moelora_lit.eval.published import CLAIMS, published_for
from moelora_lit.eval.stats import mean_ci

CONTAMINATED = {"addsub", "multiarith", "singleeq"}  # MAWPS rows are in math_10k (LLM-Adapters' announcement)


@dataclass(frozen=True)
class Run:
    """One training run, as ``scripts/sweep.py``, the ablation (:mod:`moelora_lit.analysis.runs`) and this report
    name it.

    Attributes:
        method: the method's name: an experiment config's file stem (sweeps), an ablation method, or what
            ``run.json`` / ``config.yaml`` say (report).
        lr: the learning rate of an ablation grid run; None where the config sets it.
        seed: ``seed_everything`` (None when unknown).
        config: the experiment config a sweep run starts from; None otherwise.
    """

    method: str
    lr: float | None
    seed: int | None
    config: Path | None = None


@dataclass
class RunResults:
    """A finished run's ``test_results.json``: accuracies in [0, 1] per dataset plus its evaluation settings."""

    run: Run
    path: Path
    results: dict[str, dict[str, Any]]


def _method_from_config(config: dict) -> str:
    adapter = (config.get("model") or {}).get("adapter") or {}
    targets = ",".join(t.replace("_proj", "") for t in adapter.get("target_modules") or [])
    if adapter.get("num_experts", 8) == 1:
        return f"LoRA r{adapter.get('r')} a{adapter.get('lora_alpha')} [{targets}]"
    name = f"MoELoRA r{adapter.get('r')} N{adapter.get('num_experts')} top{adapter.get('top_k')}"
    if adapter.get("router", "topk") != "topk":
        name += f" {adapter['router']}"
    if not adapter.get("contrastive_weight", 0.01):
        name += " no-cl"
    return f"{name} [{targets}]"


def load_run(results_path: Path, top: Path) -> RunResults:
    """Read one ``test_results.json`` with its ``run.json`` (searched up to ``top``) or ``config.yaml``."""
    results = json.loads(results_path.read_text())
    meta: dict[str, Any] = {}
    for folder in [results_path.parent, *results_path.parent.parents]:
        if (folder / "run.json").is_file():
            meta = json.loads((folder / "run.json").read_text())
            break
        if folder == top:
            break
    config_path = results_path.parent / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    method = meta.get("method") or (_method_from_config(config) if config else results_path.parent.name)
    seed = meta.get("seed", config.get("seed_everything") if config else None)
    run = Run(method=str(method), lr=None, seed=None if seed is None else int(seed))
    return RunResults(run=run, path=results_path, results=results)


def collect(run_dirs: list[str | Path]) -> list[RunResults]:
    """Every run under ``run_dirs``; of two runs with the same method and seed the newer one is kept."""
    runs: dict[tuple[str, int | None], RunResults] = {}
    for top in map(Path, run_dirs):
        if not top.exists():
            raise FileNotFoundError(f"{top}: no such folder")
        found = sorted(top.rglob("test_results.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"{top}: no test_results.json under it (run fit or test first)")
        for path in found:
            found_run = load_run(path, top)
            method, seed = found_run.run.method, found_run.run.seed
            if (method, seed) in runs and seed is not None:
                print(f"note: {method} seed {seed}: {path} replaces {runs[method, seed].path}", file=sys.stderr)
            runs[(method, seed) if seed is not None else (method, len(runs))] = found_run
    return list(runs.values())


def summarise(runs: list[RunResults]) -> list[dict[str, Any]]:
    """One row per (method, dataset) plus a per-method ``average`` row: the mean over its datasets except the
    contaminated ones, seed by seed (so its interval is over seeds too)."""
    by_method: dict[str, list[RunResults]] = {}
    for found_run in runs:
        by_method.setdefault(found_run.run.method, []).append(found_run)
    rows = []
    for method, group in by_method.items():
        datasets = list(dict.fromkeys(d for run in group for d in run.results))
        for dataset in datasets:
            values = [100 * run.results[dataset]["accuracy"] for run in group if dataset in run.results]
            seeds = [run.run.seed for run in group if dataset in run.results]
            rows.append(_row(method, dataset, values, seeds, [r.results[dataset] for r in group
                                                               if dataset in r.results]))
        clean = [d for d in datasets if d not in CONTAMINATED]
        complete = [run for run in group if all(d in run.results for d in clean)]
        if len(clean) > 1 and complete:
            values = [100 * sum(run.results[d]["accuracy"] for d in clean) / len(clean) for run in complete]
            rows.append(_row(method, "average", values, [r.run.seed for r in complete], []))
    return rows


def _row(method: str, dataset: str, values: list[float], seeds: list, entries: list[dict]) -> dict[str, Any]:
    mean, half = mean_ci(values)
    settings = {k: sorted({str(e.get(k)) for e in entries}) for k in ("protocol", "num_beams", "max_new_tokens")}
    return {"source": "ours", "method": method, "dataset": dataset, "n_seeds": len(values), "mean": mean,
            "ci95_half_width": half, "ci95_low": mean - half, "ci95_high": mean + half,
            "seeds": " ".join(str(s) for s in seeds), "n_rows": entries[0].get("n") if entries else None,
            **{k: "|".join(v) for k, v in settings.items()}}


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if math.isnan(row["ci95_half_width"]):
        return f"{row['mean']:.1f} (n=1)"
    return f"{row['mean']:.1f} ± {row['ci95_half_width']:.1f} (n={row['n_seeds']})"


def build_table(rows: list[dict[str, Any]], with_published: bool = True) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table (datasets down, methods across, published columns last) and the published CSV rows."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    datasets = [d for d in dict.fromkeys(r["dataset"] for r in rows) if d != "average"]
    published = published_for(datasets) if with_published else []
    pub_rows = [{"source": p.source, "method": f"{p.method}, {p.model} (published)", "dataset": d, "mean": v,
                 "n_seeds": None, "protocol": p.protocol} for p in published for d, v in
                [*p.results.items(), *([("average (theirs)", p.average)] if p.average is not None else [])]]
    columns = methods + [f"{p.method}, {p.task} (published)" for p in published]
    lines = ["| dataset | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    cells = {(r["method"], r["dataset"]): r for r in rows}
    for dataset in [*datasets, "average"]:
        name = f"{dataset} †" if dataset in CONTAMINATED else dataset
        values = [_cell(cells.get((m, dataset))) for m in methods]
        values += [f"{p.results[dataset]:.1f}" if dataset in p.results else
                   (f"{p.average:.1f} ({len(p.results)} sets)" if dataset == "average" and p.average else "")
                   for p in published]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    notes = ["", "Cells: mean ± half-width of the 95% Student-t interval over seeds, accuracy in %. "
             "Our 'average' is over the datasets listed for that method except those marked †, seed by seed."]
    for method in methods:
        first = next(r for r in rows if r["method"] == method and r["dataset"] != "average")
        notes.append(f"- {method}: protocol {first['protocol']}, num_beams {first['num_beams']}, "
                     f"max_new_tokens {first['max_new_tokens']}, seeds {first['seeds']}")
    if CONTAMINATED & set(datasets):
        notes.append("- †: contaminated by math_10k (it holds MAWPS training rows); LLM-Adapters reports MAWPS "
                     "instead. Do not compare methods on these rows.")
    for p in published:
        notes.append(f"- {p.method}, {p.model}, {p.task}: {p.source}. {p.notes}")
    notes += [f"- {source}: {claim}" for source, claim in CLAIMS] if with_published else []
    return "\n".join(lines + notes), pub_rows


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """All rows (ours and published) in one CSV."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``python -m moelora_lit report``); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m moelora_lit report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="folders holding test_results.json files (searched recursively)")
    parser.add_argument("--csv", help="also write every row (ours and published) to this CSV")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--no-published", action="store_true", help="leave out the published columns")
    args = parser.parse_args(argv)
    try:
        rows = summarise(collect(args.run_dirs))
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table, published = build_table(rows, with_published=not args.no_published)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.csv:
        write_csv(args.csv, rows + published)
    return 0
