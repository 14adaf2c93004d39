"""``protocol="llm_adapters"`` agrees with LLM-Adapters' own scoring row for row, also where it and
``protocol="explicit"`` disagree.

``their_correct`` below is an independent transcription of the scoring loop of LLM-Adapters' ``evaluate.py``
(math, AQuA) and ``commonsense_evaluate.py`` (AGI-Edgerunners/LLM-Adapters), keyed by their ``--dataset`` folder
names, written from their source and kept separate from ``moelora_lit.eval.answers`` on purpose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moelora_lit.eval.answers import PROTOCOLS, extract_answer, is_correct, normalize_gold, reference_answer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters"

_KEYWORDS = {  # commonsense_evaluate.py's extract_answer, per --dataset
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}


def their_correct(folder: str, generation: str, label: str) -> bool:
    """One row scored as LLM-Adapters does: ``generation`` is the decoded text after "### Response:"."""
    output = generation.split("### Response:")[0].strip()  # their o.split("### Response:")[1].strip()
    if folder in _KEYWORDS:
        found = re.findall(_KEYWORDS[folder], output.strip())
        return (found[0] if found else "") == label
    if folder.lower() == "aqua":
        found = re.findall(r"A|B|C|D|E", output.strip())
        return (found[0] if found else "") == label
    numbers = re.findall(r"-?\d+\.?\d*", output.replace(",", ""))
    predict = float(numbers[-1]) if numbers else float("inf")
    return abs(float(label) - predict) <= 0.001


# Real-model-like generations (several taken from the shared files' `output` field) where the two protocols differ.
DISAGREE = [
    # (folder, generation, gold, explicit correct, llm_adapters correct)
    ("gsm8k", "So, the answer is 5 arms and 3 legs, or 8 limbs in total.", "8.0", False, True),
    ("gsm8k", "The answer is 18. She has 18 - 2 = 16 left over.", "18.0", True, False),
    ("AQuA", "After simplifying, x = 12. The answer is (C).", "C", True, False),
    ("AQuA", "Each worker does 1/6 of the job. The answer is (D).", "E", False, True),  # first capital: E of "Each"
    ("boolq", "True", "true", True, False),  # their regex is lowercase only
    ("piqa", "solution1 is wrong. The correct answer is solution2", "solution2", True, False),
    ("SVAMP", "He has 3 + 4 = 7 apples.\n\n### Response:\nThe answer is 9.", "7.0", False, True),
    ("winogrande", "the correct answer is option2 (not option1)", "option1", False, False),
]


@pytest.mark.parametrize("folder,text,gold,explicit,reference", DISAGREE)
def test_protocols_on_rows_where_they_differ(folder, text, gold, explicit, reference):
    assert is_correct(folder, text, gold, protocol="llm_adapters") == their_correct(folder, text, gold) == reference
    assert is_correct(folder, text, gold) == explicit  # the default is "explicit"
    if explicit != reference:
        assert extract_answer(folder, text) != extract_answer(folder, text, protocol="llm_adapters")


def test_reference_answer_values():
    assert reference_answer("aqua", "After all, the answer is (B)") == "A"
    assert reference_answer("gsm8k", "It costs $1,234.50 in total.") == "1234.5"
    assert reference_answer("mawps", "x = -3.") == "-3"
    assert reference_answer("gsm8k", "no digits here") is None
    assert reference_answer("hellaswag", "ending3, or ending1") == "ending3"
    assert reference_answer("boolq", "False") is None


def test_unknown_protocol_is_rejected():
    assert PROTOCOLS == ("explicit", "llm_adapters")
    with pytest.raises(ValueError, match="llm_adapters"):
        extract_answer("gsm8k", "The answer is 3", protocol="lenient")


def _shared_files() -> list[Path]:
    return sorted(SHARED_DATA.glob("*/test.json")) if SHARED_DATA.is_dir() else []


@pytest.mark.skipif(not _shared_files(), reason=f"shared LLM-Adapters data not found at {SHARED_DATA}")
def test_llm_adapters_protocol_matches_their_rules_row_for_row_on_real_text():
    """Every row of every shared test file (its ``output`` is real model text): same verdict as their code."""
    differ_from_explicit = {}
    for path in _shared_files():
        folder = path.parent.name
        rows = json.loads(path.read_text(encoding="utf-8"))
        mismatches, differ = [], 0
        for i, row in enumerate(rows):
            text, gold = row.get("output") or "", str(row["answer"])
            ours = is_correct(folder, text, normalize_gold(folder, gold), protocol="llm_adapters")
            if ours != their_correct(folder, text, gold):
                mismatches.append(i)
            differ += ours != is_correct(folder, text, gold)
        assert not mismatches, f"{folder}: rows {mismatches[:10]} disagree with LLM-Adapters' rules"
        differ_from_explicit[folder] = differ
    assert differ_from_explicit.get("gsm8k", 0) > 0, differ_from_explicit  # the protocols really differ
