"""The SmolLM2-135M common-sense study: LoRA vs MoELoRA vs MoELoRA without the contrastive loss (see README.md).

    python experiments/studies/smollm2_commonsense/driver.py all [--jobs 2] [--prefer evaluate] [--out DIR]
    python experiments/studies/smollm2_commonsense/driver.py train|evaluate [--jobs 2]   # one kind of job only
    python experiments/studies/smollm2_commonsense/driver.py status     # what is done, chosen, left
    python experiments/studies/smollm2_commonsense/driver.py table      # results/ tables from the committed record
    python experiments/studies/smollm2_commonsense/driver.py routing    # results/routing/ CSVs and figure

The arms, seeds, metric and evaluations below are the whole study; the machinery is :mod:`moelora_lit.analysis`
(``study``: grids and choices, ``runner``: the jobs, ``records``: the per-example record and tables). After each
finished job the committed records in ``results/`` (``runs.csv``, ``examples.csv.gz``, ``routing/*.json``,
``commands.txt``) take in what the run folders hold, so a fresh clone resumes where they end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import pandas as pd  # noqa: E402

from moelora_lit.analysis import records, routing  # noqa: E402
from moelora_lit.analysis.runner import Job, portable, run_jobs  # noqa: E402
from moelora_lit.analysis.study import Arm, Evaluation, Study  # noqa: E402

HERE = Path(__file__).resolve().parent.relative_to(ROOT)  # configs are named relative to the repository root
RESULTS = ROOT / HERE / "results"
REDUCTION = "model.adapter.aux_reduction"
ARMS = {
    "lora": Arm((f"{HERE}/lora.yaml",)),
    "moelora": Arm((f"{HERE}/moelora.yaml",), grid={REDUCTION: ("sum", "mean")}),
    "moelora_no_contrastive": Arm((f"{HERE}/moelora_no_contrastive.yaml",), grid={REDUCTION: ("sum", "mean")},
                                  follow="moelora"),  # the pair differs in the contrastive term only
}
SEEDS = (0, 1, 2)
METRIC = "val/loss"  # the mean over the three validation slices' response loss after the epoch; lower is better
LOGLIK = ("--model.scoring=loglikelihood",)
EVALUATIONS = [Evaluation("loglikelihood-training", (*LOGLIK, "--model.loglik_prompt=training")),
               Evaluation("loglikelihood-harness", (*LOGLIK, "--model.loglik_prompt=harness"), trained=False),
               Evaluation("generate", limit=200)]  # up to 40 new tokens: the costliest scoring
COMPARISONS = [("lora", "zero_shot", None), ("lora", "zero_shot", "loglikelihood-harness"), ("moelora", "lora", None),
               ("moelora", "moelora_no_contrastive", None), ("moelora_no_contrastive", "lora", None)]
SETS = {"arc_e": "ARC-Easy", "boolq": "BoolQ", "piqa": "PIQA (transfer)"}
LOGLIK_EVALS = ("loglikelihood-training", "loglikelihood-harness")
TABLES = [(LOGLIK_EVALS, "acc", "Log-likelihood scoring, `acc` (training prompt unless named)"),
          (LOGLIK_EVALS, "acc_norm", "Log-likelihood scoring, `acc_norm` (per-character normalised)"),
          (("generate",), "acc", "Generation (greedy, first 200 rows of each set; the first line must name an option)")]


def build(out: Path, results: Path = RESULTS) -> Study:
    """The study over the run folders under ``out`` and the committed records in ``results``."""
    record = records.read_record(results / "examples.csv.gz")
    done = records.evaluated(record)
    runs = results / "runs.csv"
    return Study(ARMS, out, SEEDS, METRIC, higher_is_better=False, evaluations=EVALUATIONS, zero_shot_arm="lora",
                 record=pd.read_csv(runs) if runs.is_file() else None, done_evaluations=done)


def save_records(study: Study, results: Path = RESULTS, job: Job | None = None) -> None:
    """Take the finished runs, evaluations, routing probes and the job's command into the committed records."""
    results.mkdir(parents=True, exist_ok=True)
    study.training_record().to_csv(results / "runs.csv", index=False)
    records.fold_predictions(study.out, results / "examples.csv.gz")
    study.save_probes(results / "routing")
    if job is not None:
        records.add_commands(results / "commands.txt", [portable(job.command)])


def write_tables(study: Study, results: Path = RESULTS, out: Path | None = None) -> None:
    """``results.csv``, ``summary.json`` and ``table.md`` from the committed records (into ``out``)."""
    out = out or results
    out.mkdir(parents=True, exist_ok=True)
    record = records.read_record(results / "examples.csv.gz")
    choices = {}
    for arm in ARMS:
        if (chosen := study.choice(arm)) is not None:
            choices[arm] = {"variant": chosen[0], "lr": chosen[2]} | {k.rsplit(".", 1)[-1]: v
                                                                      for k, v in chosen[1].items()}
    table = records.accuracy(record)
    table["lr"] = table["method"].map(lambda m: choices.get(m, {}).get("lr"))
    table["aux_reduction"] = table["method"].map(lambda m: choices.get(m, {}).get("aux_reduction"))
    table.to_csv(out / "results.csv", index=False)
    summary = records.summarise(record, COMPARISONS)
    probes = routing.load_summaries(results / "routing")
    summary["routing"] = routing.specialisation_table(probes).to_dict("records") if probes else []
    payload = {"choices": choices, "grid": pd.read_csv(results / "runs.csv").to_dict("records")} | summary
    text = json.dumps(payload, indent=1, default=lambda v: None if pd.isna(v) else float(v))
    (out / "summary.json").write_text(text + "\n")
    (out / "table.md").write_text(records.markdown(summary, SETS, TABLES))
    print(f"{len(table)} result rows from {len(record)} examples -> {out}")


def write_routing(results: Path = RESULTS, out: Path | None = None, figure: bool = True) -> None:
    """Per (block x projection) routing differences from the committed probe summaries (``results/routing``)."""
    from moelora_lit.analysis import plots

    out = out or results / "routing"
    out.mkdir(parents=True, exist_ok=True)
    probes = routing.load_summaries(results / "routing")
    diffs = routing.differences(probes)
    diffs.to_csv(out / "routing_layers.csv", index=False, float_format="%.6g")
    routing.layer_summary(diffs, probes).to_csv(out / "routing_summary.csv", index=False, float_format="%.6g")
    if figure:
        import matplotlib

        matplotlib.use("Agg")
        plots.plot_layer_grid(diffs, "SmolLM2-135M, ARC-E + BoolQ + OBQA: routing of held-out rows").savefig(
            out / "routing.png", dpi=120)
    print(f"wrote routing_layers.csv, routing_summary.csv{', routing.png' if figure else ''} to {out}")


def status(study: Study) -> None:
    print(study.training_record().to_string(index=False))
    for arm in ARMS:
        print(f"choice {arm}: {study.choice(arm)}")
    print(f"training runs left: {len(study.train_jobs())}; evaluations left: {len(study.eval_jobs())}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["train", "evaluate", "all", "status", "table", "routing"])
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2_commonsense"), help="run folders")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each")
    parser.add_argument("--prefer", choices=["train", "evaluate"], default="train",
                        help="with `all`: which kind of job first (evaluate: log-likelihood, training, generation)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # configs and their data paths are relative to the repository root
    study = build(args.out)
    if args.phase == "status":
        status(study)
    elif args.phase == "table":
        write_tables(study)
    elif args.phase == "routing":
        write_routing()
    else:
        def jobs() -> list[Job]:
            train = study.train_jobs() if args.phase in ("train", "all") else []
            evals = study.eval_jobs() if args.phase in ("evaluate", "all") else []
            if args.prefer == "evaluate":
                fast = [j for j in evals if "generate" not in j.label]
                return fast + train + [j for j in evals if "generate" in j.label]
            return train + evals

        def after(job: Job, finished: bool) -> None:
            nonlocal study
            save_records(study, job=job)
            study = build(args.out)

        return 1 if run_jobs(jobs, jobs=args.jobs, threads=1, after=after) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
