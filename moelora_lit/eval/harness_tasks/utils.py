"""``!function`` hooks of the task YAMLs: LLM-Adapters rows -> harness documents (see ``harness_doc``)."""

from __future__ import annotations

from typing import Any

from moelora_lit.eval.choices import harness_doc


def _process(task: str, dataset: Any) -> Any:
    return dataset.map(lambda row: harness_doc(task, row))


def process_arc_e(dataset: Any) -> Any:
    return _process("arc_e", dataset)


def process_arc_c(dataset: Any) -> Any:
    return _process("arc_c", dataset)


def process_obqa(dataset: Any) -> Any:
    return _process("obqa", dataset)


def process_piqa(dataset: Any) -> Any:
    return _process("piqa", dataset)


def process_siqa(dataset: Any) -> Any:
    return _process("siqa", dataset)


def process_hellaswag(dataset: Any) -> Any:
    return _process("hellaswag", dataset)


def process_boolq(dataset: Any) -> Any:
    return _process("boolq", dataset)


def process_winogrande(dataset: Any) -> Any:
    return _process("winogrande", dataset)


# WinoGrande as lm_eval/tasks/winogrande/preprocess_winogrande.py: the options are contexts, the rest is shared.
def winogrande_gold(doc: dict) -> int:
    return int(doc["gold"])


def winogrande_continuation(doc: dict) -> str:
    return doc["continuation"].strip()


def winogrande_contexts(doc: dict) -> list[str]:
    return list(doc["contexts"])
