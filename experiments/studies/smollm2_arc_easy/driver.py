"""Summarise the SmolLM2 ARC-Easy runs: accuracy with a Wilson 95% interval, paired differences against
zero-shot (exact McNemar on the discordant rows), seconds per step, and routing statistics (see README.md).

    python experiments/studies/smollm2_arc_easy/driver.py --run zero_shot=runs/smollm2_arc_easy_zeroshot \
        --run lora=runs/smollm2_arc_easy_lora --run moelora=runs/smollm2_arc_easy \
        --out experiments/studies/smollm2_arc_easy/results/arc_easy.json

Each run folder is a ``default_root_dir``; its latest ``lightning_logs/version_*`` holding ``predictions.jsonl``
is read. Rows are paired by their position in the test file and their prompt text.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # run from a checkout without installing

from moelora_lit.analysis.logs import layer_mean_trend, newest, read_scalars, seconds_per_step  # noqa: E402
from moelora_lit.analysis.runner import portable  # noqa: E402
from moelora_lit.analysis.stats import sign_test, wilson  # noqa: E402


def latest_version(root: Path) -> Path:
    path = newest(root, "predictions.jsonl")
    if path is None:
        raise FileNotFoundError(f"{root}: no lightning_logs/version_*/predictions.jsonl")
    return path.parent


def step_seconds(version: Path) -> float | None:
    seconds = seconds_per_step(read_scalars(version))
    return None if seconds is None else round(seconds, 1)


def routing_summary(version: Path) -> dict | None:
    """Routing of the test pass from ``routing_test.json`` (None without one, e.g. one expert): gate entropy and
    load coefficient of variation (population std / mean of the N load shares) averaged over layers, the most
    loaded expert's share, and the same per projection kind."""
    path = version / "routing_test.json"
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    out = {}
    for dataset, loads in payload["datasets"].items():
        n = len(loads[0])
        if n == 1:
            return None
        cvs = [math.sqrt(sum((x - 1 / n) ** 2 for x in row) / n) * n for row in loads]  # shares sum to 1: mean 1/n
        entropy = payload["entropy"][dataset]
        kinds: dict[str, list[float]] = {}
        for name, cv in zip(payload["layers"], cvs, strict=True):
            kinds.setdefault(name.rsplit(".", 1)[-1], []).append(cv)
        out[dataset] = {"experts": n, "layers": len(loads), "tokens": payload["tokens"][dataset],
                        "mean_entropy": round(sum(entropy) / len(entropy), 4),
                        "max_entropy_top2": round(math.log(2), 4),
                        "mean_load_cv": round(sum(cvs) / len(cvs), 4), "max_load_cv": round(max(cvs), 4),
                        "max_expert_share": round(max(max(row) for row in loads), 4),
                        "load_cv_by_projection": {k: round(sum(v) / len(v), 4) for k, v in kinds.items()}}
    return out


def train_routing(version: Path) -> dict | None:
    """``routing/entropy`` and ``routing/load_cv`` averaged over layers at the first and last logged step."""
    scalars = read_scalars(version)
    out = {stat: layer_mean_trend(scalars, f"routing/{stat}/") for stat in ("entropy", "load_cv")}
    return None if None in out.values() else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="name=run folder; the first is the reference")
    parser.add_argument("--pair", action="append", default=[], help="method:reference, compared on shared rows")
    parser.add_argument("--dataset", default="arc_e", help="score only this dataset's rows of predictions.jsonl")
    parser.add_argument("--heldout", action="append", default=[], help="name=run folder with held-out accuracy")
    parser.add_argument("--heldout_name", default="arc_e_heldout")
    parser.add_argument("--out", required=True)
    parser.add_argument("--commands", default=None, help="a text file of the command lines that made the runs")
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.run)
    rows, report = {}, {"methods": {}}
    for name, folder in runs.items():
        version = latest_version(Path(folder))
        preds = [json.loads(line) for line in (version / "predictions.jsonl").read_text().splitlines() if line]
        preds = [p for p in preds if p.get("dataset", args.dataset) == args.dataset]
        rows[name] = {(i, p["prompt"]): bool(p["correct"]) for i, p in enumerate(preds)}  # test-file order
        correct, n = sum(rows[name].values()), len(rows[name])
        low, high = wilson(correct, n)
        answered = sum(p["extracted"] is not None for p in preds)
        report["methods"][name] = {"run": portable(str(version)), "correct": correct, "n": n,
                                   "accuracy": round(correct / n, 4),
                                   "wilson95": [round(low, 4), round(high, 4)], "answered": answered,
                                   "seconds_per_step": step_seconds(version), "routing_test": routing_summary(version),
                                   "routing_train": train_routing(version) if routing_summary(version) else None}
    reference = next(iter(runs))
    pairs = [(name, reference) for name in list(runs)[1:]] + [tuple(p.split(":", 1)) for p in args.pair]
    for name, other in pairs:
        if True:
            shared = sorted(set(rows[name]) & set(rows[other]))
            b = sum(rows[name][i] and not rows[other][i] for i in shared)
            c = sum(rows[other][i] and not rows[name][i] for i in shared)
            diff = (b - c) / len(shared)
            se = math.sqrt(max(b + c - (b - c) ** 2 / len(shared), 0)) / len(shared)  # paired (Wald) standard error
            report.setdefault("paired", []).append({
                "method": name, "vs": other, "n": len(shared), "only_method": b, "only_reference": c,
                "difference": round(diff, 4), "wald95": [round(diff - 1.96 * se, 4), round(diff + 1.96 * se, 4)],
                "mcnemar_exact_p": float(f"{sign_test(b, c):.3g}")})
    for item in args.heldout:  # selection data: accuracy on held-out training rows, never the test rows
        name, folder = item.split("=", 1)
        results = json.loads((latest_version(Path(folder)) / "test_results.json").read_text())
        report.setdefault("heldout", {})[name] = {k: results[args.heldout_name][k] for k in ("accuracy", "n")}
    if args.commands:
        report["commands"] = [line for line in Path(args.commands).read_text().splitlines() if line.strip()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, m in report["methods"].items():
        print(f"{name:10s} {m['accuracy']:.3f} ({m['correct']}/{m['n']}, 95% CI {m['wilson95']}) "
              f"s/step={m['seconds_per_step']}")
    for p in report.get("paired", []):
        print(f"{p['method']} - {p['vs']}: {p['difference']:+.3f} {p['wald95']} McNemar p={p['mcnemar_exact_p']}")


if __name__ == "__main__":
    main()
