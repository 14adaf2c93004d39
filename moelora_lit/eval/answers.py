"""Answer extraction and scoring for the LLM-Adapters math and common-sense suites.

The explicit final statement ("The answer is 576", "the correct answer is answer1", ``\\boxed{12}``)
is read first, the last one in the text winning; only when there is none do we fall back to the
LLM-Adapters rules (last number for math, first A-E for AQuA, first keyword for common sense). That is
``protocol="explicit"``, the default. ``protocol="llm_adapters"`` reproduces LLM-Adapters' ``evaluate.py`` /
``commonsense_evaluate.py`` (AGI-Edgerunners/LLM-Adapters) exactly, for numbers comparable with published tables.
Dependency-free on purpose (``re`` and ``math`` only).
"""

from __future__ import annotations

import math
import re

__all__ = [
    "ANSWER_KINDS",
    "PROTOCOLS",
    "answer_kind",
    "canonical_dataset",
    "explicit_answer",
    "extract_answer",
    "is_correct",
    "normalize_gold",
    "reference_answer",
]

PROTOCOLS = ("explicit", "llm_adapters")

ANSWER_KINDS: dict[str, str] = {
    **dict.fromkeys(["math_10k", "gsm8k", "svamp", "addsub", "multiarith", "singleeq", "mawps"], "number"),
    "aqua": "letter",
    "boolq": "bool",
    **dict.fromkeys(["piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa", "commonsense_170k"], "label"),
}

_ALIASES: dict[str, str] = {
    "arc_easy": "arc_e",
    "arc_challenge": "arc_c",
    "openbookqa": "obqa",
    "social_i_qa": "siqa",
    "socialiqa": "siqa",
    "social_iqa": "siqa",
    "math10k": "math_10k",
    "commonsense170k": "commonsense_170k",
}

_LABEL_FAMILIES: dict[str, str] = {
    "piqa": r"solution[12]",
    "siqa": r"answer[1-3]",
    "hellaswag": r"ending[1-4]",
    "winogrande": r"option[12]",
    "arc_e": r"answer[1-5]",
    "arc_c": r"answer[1-5]",
    "obqa": r"answer[1-5]",
    "commonsense_170k": r"solution[12]|answer[1-5]|ending[1-4]|option[12]",
}

TOLERANCE = 1e-3  # absolute, as LLM-Adapters' ``miss``

# "answer is", "final answer is:", "Answer:", "answer =", or a bare \boxed{...}.
_OPENER = r"(?:\banswer\b[*_]*(?:\s+(?:is|was|would\s+be|will\s+be|should\s+be)\b|\s*[:=])|\\boxed\s*\{)"
# Markdown / LaTeX / currency wrappers and a few harmless words between the opener and the answer,
# matched atomically (lookahead + backreference) so long whitespace runs cannot backtrack.
_FILLER = (
    r"(?=(?P<fill>(?:[\s*_`(\[{:~]|\\boxed\s*\{|\\text(?:bf)?\{|\\\(|\\\[|\\?[$\u20ac\u00a3\u00a5]"
    r"|(?:approximately|about|around|roughly|exactly|option|choice)\b)*))(?P=fill)"
)
_MINUS = "-\u2212"
# Space-grouped thousands ("$118 000") only when the group is not glued to a word, unit or range.
_NUMBER = r"(?:(?P<frac>\d+/\d+)(?![\d/]|\.\d)|\d{1,3}(?: \d{3})+(?:\.\d+)?(?![\w/-])|\d+(?:,\d+)*(?:\.\d+)?)"
_SIGNED = rf"(?P<neg>[{_MINUS}])?\s?\\?[$\u20ac\u00a3\u00a5]?(?P<neg2>[{_MINUS}])?(?P<num>{_NUMBER})"


def _statement(answer: str) -> re.Pattern[str]:
    """Compile opener + filler + the answer pattern (case-insensitive)."""
    return re.compile(_OPENER + _FILLER + answer, re.IGNORECASE)


_NUMBER_STATEMENT = _statement(_SIGNED)
_SIGNED_ONLY = re.compile(_SIGNED)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
_LETTER_STATEMENT = _statement(r"(?:(?P<up>(?-i:[A-E]))(?![\w'])|(?P<low>[a-e])(?=\s*(?:[.)\]*]|$)))")
_BOOL_STATEMENT = _statement(r"(?P<ans>true|false)(?![a-z])")
_LABEL_STATEMENTS = {name: _statement(rf"(?P<ans>{fam})(?!\d)") for name, fam in _LABEL_FAMILIES.items()}
_LABEL_KEYWORDS = {
    name: re.compile(rf"(?<![a-z])({fam})(?!\d)", re.IGNORECASE) for name, fam in _LABEL_FAMILIES.items()
}
_BOOL_KEYWORD = re.compile(r"(?<![a-z])(true|false)(?![a-z])", re.IGNORECASE)
_PAREN_LETTER = re.compile(r"\(([A-E])\)")
# A standalone capital A-E; "A" followed by a lowercase word is the article, not option A.
_BARE_LETTER = re.compile(r"(?<![\w'])(?!A\s+[a-z])([A-E])(?![\w'])")
_LLM_ADAPTERS_NUMBER = re.compile(r"-?\d+\.?\d*")
_GOLD_NUMBER = re.compile(rf"([{_MINUS}+]?)(\d+(?:\.\d*)?|\.\d+)")


def canonical_dataset(dataset: str) -> str:
    """Lowercase a dataset name and resolve aliases ("ARC-Easy" -> "arc_e", "AddSub" -> "addsub")."""
    name = dataset.strip().lower().replace("-", "_").replace(" ", "_")
    return _ALIASES.get(name, name)


def answer_kind(dataset: str) -> str:
    """Return "number", "letter", "bool" or "label" for a dataset.

    Raises:
        ValueError: if the dataset is unknown (the message lists the known names).
    """
    name = canonical_dataset(dataset)
    if name.startswith("synth_"):
        return "number"
    if name not in ANSWER_KINDS:
        known = ", ".join(sorted(ANSWER_KINDS))
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {known} (and any 'synth_*')")
    return ANSWER_KINDS[name]


def _format_number(digits: str, negative: bool = False) -> str:
    """Canonical decimal string: no commas/spaces, no leading or trailing zeros, no "-0"."""
    text = digits.replace(",", "").replace(" ", "")
    int_part, _, frac = text.partition(".")
    int_part = int_part.lstrip("0") or "0"
    frac = frac.rstrip("0")
    out = f"{int_part}.{frac}" if frac else int_part
    return f"-{out}" if negative and out != "0" else out


def _float_str(value: float) -> str:
    """Canonical decimal string of a finite float (no exponent)."""
    text = repr(abs(value))
    return _format_number(format(abs(value), "f") if "e" in text else text, value < 0)


def _signed(match: re.Match[str]) -> str:
    negative = bool(match.group("neg") or match.group("neg2"))
    frac = match.group("frac")
    if frac:  # "The answer is 3/4" -> 0.75
        num, den = (int(part) for part in frac.split("/"))
        if den:
            return _float_str(-num / den if negative else num / den)
        return _format_number(str(num), negative)
    return _format_number(match.group("num"), negative)


def _explicit_number(text: str) -> str | None:
    matches = list(_NUMBER_STATEMENT.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    # "The answer is 40 - 29 = 11 holes." states the result after the last "=" of that sentence.
    end = _SENTENCE_END.search(text, last.end())
    tail = text[last.end() : end.start() if end else len(text)]
    if "=" in tail:
        result = _SIGNED_ONLY.search(tail, tail.rindex("=") + 1)
        if result:
            return _signed(result)
    return _signed(last)


def explicit_answer(dataset: str, text: str) -> str | None:
    """Answer from the last explicit statement ("The answer is ..."), or None when there is none."""
    kind = answer_kind(dataset)
    if kind == "number":
        return _explicit_number(text)
    if kind == "letter":
        found = list(_LETTER_STATEMENT.finditer(text))
        return (found[-1].group("up") or found[-1].group("low")).upper() if found else None
    if kind == "bool":
        found = list(_BOOL_STATEMENT.finditer(text))
        return found[-1].group("ans").lower() if found else None
    found = list(_LABEL_STATEMENTS[canonical_dataset(dataset)].finditer(text))
    return found[-1].group("ans").lower() if found else None


def _fallback(dataset: str, kind: str, text: str) -> str | None:
    """LLM-Adapters' rules: last number / first A-E / first true|false / first label keyword."""
    if kind == "number":
        numbers = _LLM_ADAPTERS_NUMBER.findall(text.replace(",", ""))
        if not numbers:
            return None
        last = numbers[-1]
        return _format_number(last.lstrip("-"), last.startswith("-"))
    if kind == "letter":
        found = _PAREN_LETTER.search(text) or _BARE_LETTER.search(text)
        return found.group(1) if found else None
    if kind == "bool":
        found = _BOOL_KEYWORD.search(text)
        return found.group(1).lower() if found else None
    found = _LABEL_KEYWORDS[canonical_dataset(dataset)].search(text)
    return found.group(1).lower() if found else None


# LLM-Adapters' reference rules, case-sensitive and without word boundaries as there: the generation is the text
# after the prompt's "### Response:" and before any further "### Response:" the model writes, stripped.
_REF_NUMBER = re.compile(r"-?\d+\.?\d*")
_REF_LETTER = re.compile(r"A|B|C|D|E")
_REF_KEYWORDS: dict[str, re.Pattern[str]] = {
    "bool": re.compile(r"true|false"),
    **{name: re.compile(fam) for name, fam in _LABEL_FAMILIES.items()},  # "solution[12]" = "solution1|solution2"
}


def reference_answer(dataset: str, text: str) -> str | None:
    """LLM-Adapters' extraction (``protocol="llm_adapters"``): the last ``-?\\d+\\.?\\d*`` after removing commas
    (math, MAWPS included), the first capital A-E anywhere (AQuA), the first keyword, lowercase only (common sense).

    Returns:
        The answer normalised like ``normalize_gold`` (numbers) or as matched, or None (LLM-Adapters: inf / "").
    """
    kind = answer_kind(dataset)
    text = text.split("### Response:")[0].strip()
    if kind == "number":
        numbers = _REF_NUMBER.findall(text.replace(",", ""))
        return _float_str(float(numbers[-1])) if numbers else None
    key = "bool" if kind == "bool" else canonical_dataset(dataset)
    found = (_REF_LETTER if kind == "letter" else _REF_KEYWORDS[key]).search(text)
    return found.group(0) if found else None


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"answer protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")


def extract_answer(dataset: str, text: str, protocol: str = "explicit") -> str | None:
    """Extract the predicted answer from a generation, normalised like ``normalize_gold``.

    Args:
        protocol: ``"explicit"`` (the last explicit statement, else LLM-Adapters-like fallbacks) or
            ``"llm_adapters"`` (their rules exactly, see :func:`reference_answer`).

    Returns:
        The answer string (e.g. "576", "-3.5", "D", "true", "answer1"), or None if nothing was found.
    """
    _check_protocol(protocol)
    kind = answer_kind(dataset)
    if not text:
        return None
    if protocol == "llm_adapters":
        return reference_answer(dataset, text)
    stated = explicit_answer(dataset, text)
    return stated if stated is not None else _fallback(dataset, kind, text)


def normalize_gold(dataset: str, gold: str) -> str:
    """Canonical form of a gold answer ("576.0" -> "576", "(A)" -> "A", "True" -> "true").

    Raises:
        ValueError: if the gold answer cannot be of the dataset's answer kind.
    """
    kind = answer_kind(dataset)
    raw = str(gold).strip()
    if kind == "number":
        cleaned = raw.replace(",", "").replace("$", "").strip()
        match = _GOLD_NUMBER.fullmatch(cleaned)
        if match:
            return _format_number(match.group(2), match.group(1) in ("-", "\u2212"))
        try:
            value = float(cleaned)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"{dataset}: gold answer {gold!r} is not a number")
        return _float_str(value)
    if kind == "letter":
        match = re.fullmatch(r"\(?\s*([A-Ea-e])\s*\)?", raw)
        if not match:
            raise ValueError(f"{dataset}: gold answer {gold!r} is not an option letter A-E")
        return match.group(1).upper()
    if kind == "bool":
        if raw.lower() not in ("true", "false"):
            raise ValueError(f"{dataset}: gold answer {gold!r} is not true/false")
        return raw.lower()
    family = _LABEL_FAMILIES[canonical_dataset(dataset)]
    if not re.fullmatch(family, raw, re.IGNORECASE):
        raise ValueError(f"{dataset}: gold answer {gold!r} is not one of {family!r}")
    return raw.lower()


def is_correct(dataset: str, text: str, gold: str, protocol: str = "explicit") -> bool:
    """Whether the generation's extracted answer matches gold (numbers: abs tolerance 1e-3, LLM-Adapters' ``miss``).

    Under ``protocol="llm_adapters"`` labels are compared as strings, case-sensitive, as LLM-Adapters does.

    Raises:
        ValueError: if gold is not of the dataset's answer kind, or the protocol is unknown.
    """
    target = normalize_gold(dataset, gold)
    pred = extract_answer(dataset, text, protocol)
    if pred is None:
        return False
    if answer_kind(dataset) == "number":
        return abs(float(target) - float(pred)) <= TOLERANCE
    return pred == target
