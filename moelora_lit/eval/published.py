"""Published numbers to put beside ours, stored as data with their sources (accuracy in %, LLaMA-7B).

Only numbers read from their source are here. LLM-Adapters' README tables were read at commit
e51f48013a4dc0e710d087fa5c89395f1997331d of AGI-Edgerunners/LLM-Adapters (the tables after the MAWPS announcement:
math on GSM8K, AQuA, MAWPS and SVAMP only, because math_10k contains MAWPS training data and so AddSub, MultiArith
and SingleEq are contaminated). Trained with ``finetune.py`` and scored by ``evaluate.py`` /
``commonsense_evaluate.py`` (4 beams): ``model.answer_protocol: llm_adapters`` here. The LoRA setting of those rows,
r=32, alpha=64 on q,k,v,up,down (``llama7b_*_lora_llm_adapters`` here), is not written in that README; it is the
setting later work reproducing these rows uses (e.g. the DoRA repository's commonsense scripts).

The MoELoRA paper (arXiv 2402.12851) reports per-dataset accuracies in its tables; no readable source of those
tables is at hand, so none is stored. Its abstract's summary figure is kept as a claim.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Published:
    """One published result row: ``results`` maps our dataset names to accuracy in %."""

    method: str
    model: str
    task: str
    results: dict[str, float]
    source: str
    average: float | None = None
    notes: str = ""
    protocol: str = "llm_adapters"
    extra: dict[str, str] = field(default_factory=dict)


_README = ("LLM-Adapters README, 'Finetune Result' tables (github.com/AGI-Edgerunners/LLM-Adapters, "
           "commit e51f48013a4dc0e710d087fa5c89395f1997331d)")

PUBLISHED: list[Published] = [
    Published(method="LoRA (LLM-Adapters)", model="LLaMA-7B", task="math",
              results={"gsm8k": 37.5, "aqua": 18.9, "mawps": 79.0, "svamp": 52.1}, average=46.9, source=_README,
              notes="trained on math_10k; AddSub/MultiArith/SingleEq not reported (contaminated by math_10k)"),
    Published(method="LoRA (LLM-Adapters)", model="LLaMA-7B", task="commonsense",
              results={"boolq": 68.9, "piqa": 80.7, "siqa": 77.4, "hellaswag": 78.1, "winogrande": 78.8,
                       "arc_e": 77.8, "arc_c": 61.3, "obqa": 74.8}, average=74.7, source=_README,
              notes="trained on commonsense_170k"),
]

CLAIMS: list[tuple[str, str]] = [
    ("MoELoRA paper (Luo et al., 2024, arXiv 2402.12851), abstract",
     "11 math and common-sense tasks; in math reasoning MoELoRA's average is 4.2% higher than LoRA's with the same "
     "number of parameters. Per-dataset figures: not stored (not verified from a readable source)."),
]


def published_for(datasets: list[str]) -> list[Published]:
    """The published rows that report at least one of ``datasets``."""
    wanted = set(datasets)
    return [row for row in PUBLISHED if wanted & set(row.results)]
