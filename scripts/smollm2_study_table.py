"""Tables of the SmolLM2 common-sense study (``python scripts/smollm2_study.py table``), from its run folders.

Writes into ``experiments/results/``:

- ``smollm2_commonsense.csv``: one row per method, seed, dataset and scoring (``zero_shot`` has no seed):
  ``method,seed,dataset,scoring,prompt,acc,acc_norm,n,lr,aux_reduction``.
- ``smollm2_commonsense_grid.csv``: every training run (variant, lr, seed, validation loss, s/step).
- ``smollm2_commonsense.json``: the choices, per method and dataset the seed mean with its 95% t interval and each
  seed's Wilson interval, paired differences between methods (seeds paired: t over seeds; examples paired:
  per-example correctness averaged over the shared seeds, 95% t interval over examples), the sanity check
  (LoRA minus zero-shot, examples paired), and the routing summary.
- ``smollm2_commonsense_table.md``: the headline table (log-likelihood, acc with intervals) and LoRA minus zero-shot.
- ``smollm2_commonsense_routing/<method>_seed<S>.json``: each chosen MoELoRA run's ``routing_probe.json``.
- ``smollm2_commonsense_commands.txt``: the exact command of every run and evaluation.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from moelora_lit.analysis.routing import load_summaries, specialisation_table
from moelora_lit.analysis.stats import paired_t, t_interval

COLUMNS = ["method", "seed", "dataset", "scoring", "prompt", "acc", "acc_norm", "n", "lr", "aux_reduction"]
PAIRS = [("moelora", "lora"), ("moelora", "moelora_no_contrastive"), ("moelora_no_contrastive", "lora")]


def newest(folder: Path, name: str) -> Path | None:
    found = sorted(folder.rglob(name), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return found[-1] if found else None


def eval_rows(folder: Path, meta: dict[str, Any], scoring: tuple) -> list[dict[str, Any]]:
    """CSV rows of one evaluation folder (empty until its ``test_results.json`` exists)."""
    path = newest(folder, "test_results.json")
    if path is None:
        return []
    rows = []
    for dataset, r in json.loads(path.read_text()).items():
        rows.append(meta | {"dataset": dataset, "scoring": scoring[1], "prompt": scoring[2],
                            "acc": r.get("acc", r.get("accuracy")), "acc_norm": r.get("acc_norm"), "n": r["n"]})
    return rows


@functools.lru_cache(maxsize=256)
def read_predictions(path: Path, mtime_ns: int) -> tuple[dict[str, Any], ...]:
    """The rows of one ``predictions.jsonl``, parsed once per version of the file (``mtime_ns`` keys the cache)."""
    return tuple(json.loads(line) for line in path.read_text().splitlines())


def correctness(folder: Path, key: str = "correct") -> dict[str, np.ndarray]:
    """Per dataset, the per-example 0/1 ``key`` of the newest ``predictions.jsonl`` under ``folder``, in order."""
    path = newest(folder, "predictions.jsonl")
    out: dict[str, list[float]] = {}
    for row in read_predictions(path, path.stat().st_mtime_ns) if path else ():
        if key in row:
            out.setdefault(row["dataset"], []).append(float(row[key]))
    return {k: np.asarray(v) for k, v in out.items()}


def collect(study: Any) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], dict[tuple, Path]]:
    """(results, grid, choices, {(method, seed, scoring name): eval folder})."""
    from smollm2_study import METHODS, SCORINGS, SEEDS  # noqa: PLC0415

    rows, folders = [], {}
    for s in SCORINGS:
        folder = study.out / "zero_shot" / "eval" / s[0]
        rows += eval_rows(folder, {"method": "zero_shot", "seed": None, "lr": None, "aux_reduction": None}, s)
        folders[("zero_shot", None, s[0])] = folder
    grid = []
    for variant_dir in sorted((study.out / "train").glob("*")):
        for run in sorted(p for p in variant_dir.glob("lr*/*/seed*") if p.name[4:].isdigit()):
            info = study.trained(run) or {}
            grid.append({"variant": variant_dir.name, "lr": float(run.parents[1].name[2:]),
                         "seed": int(run.name[4:]), "val_loss": info.get("val_loss"),
                         "s_per_step": info.get("s_per_step"), "steps": info.get("steps")})
    choices = {}
    for method in METHODS:
        chosen = study.choice(method)
        if chosen is None:
            continue
        variant, lr = chosen
        reduction = variant.split("-")[1] if "-" in variant else None
        choices[method] = {"variant": variant, "lr": lr, "aux_reduction": reduction}
        for seed in SEEDS:
            for s in SCORINGS:
                folder = study.run_folder(variant, lr, seed) / "eval" / s[0]
                meta = {"method": method, "seed": seed, "lr": lr, "aux_reduction": reduction}
                rows += eval_rows(folder, meta, s)
                folders[(method, seed, s[0])] = folder
    return pd.DataFrame(rows, columns=COLUMNS), pd.DataFrame(grid), choices, folders


def summarise(df: pd.DataFrame, folders: dict[tuple, Path]) -> dict[str, Any]:
    """Intervals per method and the paired comparisons (see the module docstring)."""
    from smollm2_study import SCORINGS  # noqa: PLC0415

    out: dict[str, Any] = {"methods": [], "paired": [], "sanity": []}
    names = {(s[1], s[2]): s[0] for s in SCORINGS}
    for (method, dataset, scoring, prompt), block in df.groupby(["method", "dataset", "scoring", "prompt"],
                                                                dropna=False):
        mean, low, high, n = t_interval(block["acc"])
        seeds = []
        for _, r in block.iterrows():
            ci = binomtest(round(r["acc"] * r["n"]), int(r["n"])).proportion_ci(method="wilson")
            seeds.append({"seed": r["seed"], "acc": r["acc"], "wilson95": [ci.low, ci.high], "n": int(r["n"])})
        entry = {"method": method, "dataset": dataset, "scoring": scoring, "prompt": prompt, "acc_mean": mean,
                 "t95": [low, high], "seeds": n, "per_seed": seeds,
                 "acc_norm_mean": block["acc_norm"].astype(float).mean()}
        for key, label in (("correct", "acc"), ("correct_norm", "acc_norm")):
            runs, y = seed_mean(folders, method, names[(scoring, prompt)], dataset, key)
            if y is not None:
                entry[f"{label}_examples95"] = examples_interval(y, len(runs))
        out["methods"].append(entry)
    for (dataset, scoring, prompt), block in df.groupby(["dataset", "scoring", "prompt"]):
        table = block.pivot_table(index="seed", columns="method", values="acc")
        name = names[(scoring, prompt)]
        for a, b in PAIRS + [("lora", "zero_shot")]:
            example = paired_examples(folders, a, b, name, dataset)
            if example is None:
                continue
            both = table[[a, b]].dropna() if b != "zero_shot" and {a, b} <= set(table) else None
            seed_paired = paired_t(both[a], both[b]) if both is not None and len(both) else None
            key = "sanity" if b == "zero_shot" else "paired"
            out[key].append({"a": a, "b": b, "dataset": dataset, "scoring": scoring, "prompt": prompt,
                             "examples_paired": example, "seeds_paired": seed_paired,
                             "examples_paired_norm": paired_examples(folders, a, b, name, dataset, "correct_norm")})
    for dataset in sorted(set(df["dataset"])):  # against the stronger zero-shot prompt too: the harness's
        example = paired_examples(folders, "lora", "zero_shot", "loglikelihood-training", dataset,
                                  name_b="loglikelihood-harness")
        if example is not None:
            out["sanity"].append({"a": "lora", "b": "zero_shot (harness prompt)", "dataset": dataset,
                                  "scoring": "loglikelihood", "prompt": "training vs harness",
                                  "examples_paired": example, "seeds_paired": None,
                                  "examples_paired_norm": paired_examples(
                                      folders, "lora", "zero_shot", "loglikelihood-training", dataset,
                                      "correct_norm", name_b="loglikelihood-harness")})
    return out


def examples_interval(y: np.ndarray, runs: int) -> list[float]:
    """95% interval of the mean of per-example correctness ``y`` (averaged over ``runs`` seeds): Wilson for one run
    or when every example agrees (a t interval would have width 0), else t over the examples."""
    mean, low, high, n = t_interval(y)
    if runs == 1 or not high > low:
        ci = binomtest(round(mean * n), n).proportion_ci(method="wilson")
        return [ci.low, ci.high]
    return [low, high]


def seed_mean(folders: dict[tuple, Path], method: str, name: str, dataset: str, key: str = "correct",
              seeds: list | None = None) -> tuple[list, np.ndarray | None]:
    """(seeds, per-example ``key`` averaged over them) of ``method``'s evaluation ``name`` on ``dataset``: all the
    seeds it has, or those of ``seeds`` it has (array None when there are none)."""
    found = {seed: c[dataset] for (m, seed, s), f in folders.items() if m == method and s == name
             and dataset in (c := correctness(f, key))}
    chosen = sorted(found, key=str) if seeds is None else [s for s in seeds if s in found]
    if not chosen or len({found[s].shape for s in chosen}) != 1:
        return chosen, None
    return chosen, np.mean([found[s] for s in chosen], axis=0)


def paired_examples(folders: dict[tuple, Path], a: str, b: str, name: str, dataset: str,
                    key: str = "correct", name_b: str | None = None) -> dict[str, Any] | None:
    """a minus b per example of ``key`` (``correct``: acc, ``correct_norm``: acc_norm), each averaged over the seeds
    both have (zero-shot: its one run), 95% t interval over examples; also the exact sign test of the examples
    where they differ. ``b`` is read from scoring ``name_b`` when given (default ``name``)."""
    seeds, ya = seed_mean(folders, a, name, dataset, key)
    if b != "zero_shot":  # the seeds both have; zero-shot's one run pairs with every seed's mean
        seeds = seed_mean(folders, b, name_b or name, dataset, key, seeds)[0]
        ya = seed_mean(folders, a, name, dataset, key, seeds)[1]
    yb = seed_mean(folders, b, name_b or name, dataset, key, None if b == "zero_shot" else seeds)[1]
    if ya is None or yb is None or ya.shape != yb.shape:
        return None
    diff = ya - yb
    mean, low, high, n = t_interval(diff)
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    p = binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
    return {"diff": mean, "t95": [low, high], "n": n, "seeds": [s for s in seeds if s is not None],
            "a_better": wins, "b_better": losses, "sign_test_p": p}


SETS = {"arc_e": "ARC-Easy", "boolq": "BoolQ", "piqa": "PIQA (transfer)"}
TABLES = [("loglikelihood", "acc", "Log-likelihood scoring, `acc`"),
          ("loglikelihood", "acc_norm", "Log-likelihood scoring, `acc_norm` (per-character normalised)"),
          ("generate", "acc", "Generation (greedy, first 200 rows of each set; the first line must name an option)")]


def points(low: float, mean: float, high: float, sign: str = "") -> str:
    return f"{100 * mean:{sign}.1f} [{100 * low:{sign}.1f}, {100 * high:{sign}.1f}]"


def markdown(summary: dict[str, Any]) -> str:
    """Three tables (log-likelihood ``acc`` and ``acc_norm``, generation ``acc``): per method and test set the mean
    over seeds, the 95% t interval over examples of the seed-averaged correctness (zero-shot: its one run) and the
    range over seeds; then every paired difference (examples paired, and seeds paired where both have seeds)."""
    out = []
    for scoring, metric, title in TABLES:
        cells: dict[tuple[str, str], str] = {}
        for m in summary.get("methods", []):
            interval = m.get(f"{metric}_examples95")
            if m["scoring"] != scoring or interval is None:
                continue
            label = f"zero-shot, {m['prompt']} prompt" if m["method"] == "zero_shot" else m["method"]
            values = [s["acc"] for s in m["per_seed"]] if metric == "acc" else None
            cell = points(interval[0], m[f"{metric}_mean"], interval[1])
            if values and len(values) > 1:
                cell += f" ({100 * min(values):.1f}-{100 * max(values):.1f})"
            cells[label, m["dataset"]] = cell
            cells[label, "seeds"] = str(m["seeds"]) if m["method"] != "zero_shot" else "-"
        if not cells:
            continue
        labels = sorted({k[0] for k in cells}, key=lambda x: (not x.startswith("zero"), x))
        out += [f"### {title}", "", "| method | seeds | " + " | ".join(SETS.values()) + " |", "|---" * 5 + "|"]
        out += [f"| {x} | {cells.get((x, 'seeds'), '')} | " + " | ".join(cells.get((x, d), "-") for d in SETS) + " |"
                for x in labels]
        out.append("")
    out += ["Cells: mean over seeds; 95% interval over the test examples (one run: Wilson; several: t over the "
            "examples of the seed-averaged correctness); for `acc` with several seeds, the lowest and highest seed.",
            "", "### Paired differences (points)", "",
            "| a - b | set | scoring | `acc`: diff [95%], examples paired | a / b better | sign p | `acc_norm` diff "
            "[95%] | `acc` diff, seeds paired [95%] |", "|---" * 8 + "|"]
    for row in summary.get("sanity", []) + summary.get("paired", []):
        e, norm, seeds = row["examples_paired"], row.get("examples_paired_norm"), row.get("seeds_paired")
        out.append(f"| {row['a']} - {row['b']} | {SETS.get(row['dataset'], row['dataset'])} | {row['scoring']} "
                   f"({row['prompt']}) | {points(e['t95'][0], e['diff'], e['t95'][1], '+')} | "
                   f"{e['a_better']} / {e['b_better']} | {e['sign_test_p']:.2g} | "
                   + (points(norm["t95"][0], norm["diff"], norm["t95"][1], "+") if norm else "-") + " | "
                   + (points(seeds["low"], seeds["diff"], seeds["high"], "+") + f" (n {seeds['n']})"
                      if seeds and seeds["n"] > 1 else "-") + " |")
    return "\n".join(out) + "\n"


def portable(command: str) -> str:
    """A recorded command as run from the repository root: ``python``, repository-relative configs, ``../shared``."""
    command = re.sub(r"^\S*/bin/python3?(\.\d+)? ", "python ", command)
    command = re.sub(r"/[^\s\"']*/(experiments/smollm2_commonsense_\w+\.yaml)", r"\1", command)
    return re.sub(r"/[^\s\"']*/shared/data/", "../shared/data/", command)


def write_table(study: Any, results: Path) -> None:
    """Write the CSV, grid CSV, JSON, routing files and commands (see the module docstring)."""
    df, grid, choices, folders = collect(study)
    results.mkdir(parents=True, exist_ok=True)
    df.astype({"seed": "Int64", "acc_norm": float}).round({"acc": 6, "acc_norm": 6}).to_csv(  # zero-shot: no seed
        results / "smollm2_commonsense.csv", index=False)
    grid.to_csv(results / "smollm2_commonsense_grid.csv", index=False)
    routing = results / "smollm2_commonsense_routing"
    for (method, seed, _), folder in folders.items():
        probe = newest(folder.parent.parent, "routing_probe.json") if method != "zero_shot" else None
        if probe is not None:
            routing.mkdir(exist_ok=True)
            shutil.copyfile(probe, routing / f"{method}_seed{seed}.json")
    summary = summarise(df, folders) if len(df) else {}
    if routing.is_dir():
        summary["routing"] = specialisation_table(load_summaries(routing)).to_dict("records")
    payload = {"choices": choices, "grid": grid.to_dict("records")} | summary
    (results / "smollm2_commonsense.json").write_text(json.dumps(payload, indent=1, default=float))
    (results / "smollm2_commonsense_table.md").write_text(markdown(summary))
    commands = ["# python scripts/smollm2_study.py all --jobs 2 --prefer evaluate   (then: table); each run's and "
                "evaluation's command:"]
    for log in sorted(study.out.rglob("run.json")):  # without the --ckpt_path of a resumed attempt
        commands.append(portable(re.sub(r" --ckpt_path \S+", "", json.loads(log.read_text())["command"])))
    for folder in sorted({p.parent for name in ("test.log", "command.txt") for p in study.out.rglob(name)}):
        log = folder / "test.log" if (folder / "test.log").is_file() else folder / "command.txt"  # restored record
        commands += [portable(line[2:]) for line in log.read_text(errors="replace").splitlines()
                     if line.startswith("$ ")][-1:]
    (results / "smollm2_commonsense_commands.txt").write_text("\n".join(commands) + "\n")
    print(f"{len(df)} result rows, {len(grid)} training runs -> {results}")
