"""The SmolLM2-135M methods study's protocol as data: paths, arms, seeds, evaluations and the tables' layout (read by
``driver.py`` and its two helpers, ``methods_routing.py`` and ``methods_sizing.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import yaml  # noqa: E402

from moelora_lit.analysis.study import Arm, Evaluation  # noqa: E402

HERE = Path(__file__).resolve().parent.relative_to(ROOT)  # configs are named relative to the repository root
RESULTS = ROOT / HERE / "results"
OLD_RESULTS = ROOT / "experiments" / "studies" / "smollm2_commonsense" / "results"  # the reused arms' records
ARMS_FILE = ROOT / HERE / "arms.yaml"
METHODS = ["zero_shot", "lora", "moelora", "moelora_no_contrastive", "loramoe", "hydralora", "mola", "flylora",
           "mixlora"]
SEEDS = (0, 1, 2)
METRIC = "val/loss"  # the mean over the three validation slices' response loss after the epoch; lower is better
LOGLIK = ("--model.scoring=loglikelihood",)
EVALUATIONS = [Evaluation("loglikelihood-training", (*LOGLIK, "--model.loglik_prompt=training")),
               Evaluation("loglikelihood-harness", (*LOGLIK, "--model.loglik_prompt=harness"), trained=False),
               Evaluation("generate", limit=200)]  # the same three as smollm2_commonsense (harness: base only)
SCORED = {"loglikelihood-training": ("loglikelihood", "training"), "generate": ("generate", "training")}
SETS = {"arc_e": "ARC-Easy", "boolq": "BoolQ", "piqa": "PIQA (transfer)"}
TABLES = [(("loglikelihood-training",), "acc", "Log-likelihood scoring in the training prompt, `acc`"),
          (("loglikelihood-training",), "acc_norm", "Log-likelihood scoring, `acc_norm` (per-character normalised)"),
          (("generate",), "acc", "Generation (greedy, first 200 rows of each set; the first line must name an option)")]
CSV_COLUMNS = ["method", "seed", "dataset", "scoring", "prompt", "acc", "acc_norm", "n", "lr", "trainable_params"]
STEPS = 240  # one epoch of 1920 rows in batches of 8


def read_arms(path: Path = ARMS_FILE) -> dict[str, dict]:
    """``arms.yaml``: arm -> ``{configs, grid, follow, rank, reused}``."""
    return yaml.safe_load(path.read_text())


def arms(table: dict[str, dict] | None = None) -> dict[str, Arm]:
    table = table or read_arms()
    return {name: Arm(tuple(spec["configs"]), grid={k: tuple(str(v) for v in vs)
                                                    for k, vs in (spec.get("grid") or {}).items()},
                      follow=spec.get("follow")) for name, spec in table.items()}
