"""A split's dataset entries (:class:`DatasetSpec`), their checks, and the response style they train on.

``response`` rewrites the training response of multiple-choice rows before tokenization
(:func:`rewrite_responses`): ``dataset`` keeps each row's ``output``; ``option_first`` writes the chosen option's
text before LLM-Adapters' closing statement (``a bacterial population in the bloodstream, so the correct answer
is answer2``); ``cloze`` asks the question alone (no list of options) and answers with the chosen option's text,
the formulation lm-evaluation-harness scores small models in, inside the training prompt. The log-likelihood
scoring with the ``training`` prompt scores each option in the entry's style. A ``cloze`` row keeps its original
instruction as ``source_instruction``, where the options are read from.

Why these exist: a response that is only a label (``answer2``) asks the model to bind option symbols, which small
models cannot do (SmolLM2-135M learned the label prior instead); with the options listed in the prompt
(``option_first``) it still picked among them at chance; ``cloze`` is where its knowledge shows (see
``experiments/studies/smollm2_commonsense/results/sizing.md``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moelora_lit.data.formats import REGISTRY
from moelora_lit.eval.choices import (
    RESPONSES,
    cloze_instruction,
    is_multiple_choice,
    parse_question,
    trained_response,
)


@dataclass
class DatasetSpec:
    """One dataset of a split.

    Attributes:
        name: registry name (``gsm8k``, ``commonsense_170k``, ``synth_add``, ...).
        path: local JSON / JSONL / parquet file, or a folder holding ``test.json`` / ``train.json``.
        hub_id: override the registry's hub id (also a local dataset folder for `datasets.load_dataset`).
        hub_config: hub configuration name.
        split: default ``"train"`` for train specs, else the registry's eval split.
        limit: keep the first N rows (after ``offset``).
        offset: skip the first N rows first, e.g. a validation slice ``{path: train.json, offset: 1000, limit: 150}``
            of a training file whose first rows are trained on.
        alias: display name used in metric tags (default: the canonical name).
        response: ``dataset`` (each row's own ``output``), ``option_first`` (multiple-choice rows: the chosen
            option's text, then the row's closing statement) or ``cloze`` (the question alone, answered by the
            option's text); see the module docstring. Give val/test sets the style their training set had: the
            ``training`` log-likelihood prompt scores options in it.
        task_group: the task-group label of every row (0 or 1), for LoRAMoE's localized balance loss
            (``model.adapter.balance_loss: localized``): group 1's samples favour the first half of the experts,
            group 0's the second half. None: no group.
    """

    name: str
    path: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    split: str | None = None
    limit: int | None = None
    alias: str | None = None
    offset: int = 0
    response: str = "dataset"
    task_group: int | None = None


def as_spec(spec: DatasetSpec | dict | str, key: str) -> DatasetSpec:
    """A :class:`DatasetSpec` from a name, a dict (unknown keys rejected, naming ``key``) or a spec."""
    if isinstance(spec, str):
        spec = DatasetSpec(name=spec)
    elif isinstance(spec, dict) or (hasattr(spec, "__dict__") and not isinstance(spec, DatasetSpec)):
        values = dict(spec) if isinstance(spec, dict) else dict(vars(spec))
        values = {k: v for k, v in values.items() if not k.startswith("__")}  # jsonargparse's __path__
        fields = [f.name for f in dataclasses.fields(DatasetSpec)]
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"{key}: unknown key(s) {unknown}; valid keys: {fields}")
        if "name" not in values:
            raise ValueError(f"{key}: missing 'name' (one of: {', '.join(REGISTRY)})")
        spec = DatasetSpec(**values)
    elif not isinstance(spec, DatasetSpec):
        raise ValueError(f"{key}: expected a dataset spec (name / dict / DatasetSpec), got {spec!r}")
    if spec.response not in RESPONSES:
        raise ValueError(f"{key}.response={spec.response!r}: choose one of {', '.join(RESPONSES)}")
    return spec


def check_positive(value: Any, key: str, allow_none: bool = False, minimum: int = 1) -> None:
    """ValueError naming ``key`` unless ``value`` is an integer >= ``minimum`` (or None where allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


def rewrite_responses(rows: list[dict[str, str]], spec: DatasetSpec, key: str, origin: str) -> None:
    """Write each row's ``output`` in ``spec.response``'s style, in place (``dataset``: unchanged).

    Raises:
        ValueError: naming ``key``, the file and the row, for a set that is not multiple choice or a row whose
            options cannot be read.
    """
    if spec.response == "dataset":
        return
    if not is_multiple_choice(spec.name):
        raise ValueError(f"{key}.response={spec.response!r}: '{spec.name}' is not a multiple-choice set; "
                         "use response: dataset")
    for n, row in enumerate(rows):
        try:
            q = parse_question(spec.name, row["instruction"], row["answer"])
        except ValueError as err:
            raise ValueError(f"{key}: {origin}: row {n + spec.offset} (0-based): {err}; "
                             f"{key}.response={spec.response!r} needs each option") from None
        row["output"] = trained_response(q, q.gold, spec.response)
        if spec.response == "cloze":  # the options stay readable for scoring in ``source_instruction``
            row["source_instruction"], row["instruction"] = row["instruction"], cloze_instruction(q)
