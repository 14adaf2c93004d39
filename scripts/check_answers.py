"""Check answer extraction on the shared LLM-Adapters test files, using each row's ``output``.

For every ``<data-dir>/*/test.json`` this prints one markdown table row with

1. ``explicit``: rows that state their answer ("The answer is ...": our explicit-statement regex or an
   independent token-based reading of the last "answer is" sentence finds one), and ``stated=ours``: the
   share of those where ``extract_answer`` returns that stated answer (must be >= 99%);
2. ``ours`` vs ``LLM-Adapters``: correct rows under ``is_correct`` and under LLM-Adapters' own rules
   (re-implemented below); ours must be >= theirs minus half a percentage point;
3. ``llm_adapters=theirs``: rows where ``is_correct(..., protocol="llm_adapters")`` gives the same verdict as
   that re-implementation (must be every row).

Usage: ``python scripts/check_answers.py [--data-dir ../shared/data/llm-adapters] [--show 5]``.
Exits 1 if any dataset fails a check.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelora_lit.eval.answers import (  # noqa: E402
    answer_kind,
    canonical_dataset,
    explicit_answer,
    extract_answer,
    is_correct,
    normalize_gold,
)

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "llm-adapters"
MIN_STATED_PCT = 99.0
MAX_GAP_PP = 0.5
# "-$1,234.5", "29/3", "240g", "67\"", "3:00" (read as 3), "20%".
_NUMBER_TOKEN = re.compile(
    r"([-\u2212]?)[$\u20ac\u00a3]?([-\u2212]?)(\d[\d,]*(?:\.\d+)?)(?:/(\d+))?(?::\d\d)?[%$\"a-zA-Z]*"
)

# LLM-Adapters' keyword families (evaluate/commonsense_evaluate.py), case-sensitive as there.
_LLM_ADAPTERS_KEYWORDS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "siqa": r"answer1|answer2|answer3|answer4|answer5",
    "arc_e": r"answer1|answer2|answer3|answer4|answer5",
    "arc_c": r"answer1|answer2|answer3|answer4|answer5",
    "obqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}


def llm_adapters_correct(dataset: str, text: str, gold: str) -> bool:
    """LLM-Adapters' scoring: last number (tol 1e-3), first A-E, or first keyword."""
    kind = answer_kind(dataset)
    if kind == "number":
        numbers = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
        pred = float(numbers[-1]) if numbers else math.inf
        return abs(float(gold) - pred) <= 0.001
    if kind == "letter":
        found = re.findall(r"A|B|C|D|E", text.strip())
        return bool(found) and found[0] == gold
    pattern = _LLM_ADAPTERS_KEYWORDS.get(canonical_dataset(dataset), "|".join(_LLM_ADAPTERS_KEYWORDS.values()))
    found = re.findall(pattern, text.strip())
    return bool(found) and found[0] == gold


def _stated_number(sentence: str) -> float | None:
    """Token-based reading of one "answer is" sentence: first number, or the one after the last "="."""
    after_eq = "=" in sentence
    if after_eq:
        sentence = sentence.rsplit("=", 1)[1]
    tokens = [t.strip("*_`:;(){}[]\\").replace("\\boxed{", "") for t in sentence.split()]
    tokens = [t for t in tokens if t]
    for i, tok in enumerate(tokens):
        match = _NUMBER_TOKEN.fullmatch(tok)
        if match:
            digits = match.group(3).replace(",", "")
            if match.group(4):  # a fraction "29/3"
                value = float(digits) / float(match.group(4))
                return -value if (match.group(1) or match.group(2)) else value
            for nxt in tokens[i + 1 :]:  # "$118 000" -> 118000
                if not re.fullmatch(r"\d{3}(?:\.\d+)?", nxt) or "." in digits:
                    break
                digits += nxt
            value = float(digits)
            return -value if (match.group(1) or match.group(2)) else value
        if not after_eq:
            return None  # "the answer is not 19": not a statement of a number
    return None


def stated_answer(dataset: str, text: str) -> str | None:
    """The answer the text states after its last "answer is" (None if it states none)."""
    kind = answer_kind(dataset)
    for segment in reversed(re.split(r"answer\s+is\s*:?", text, flags=re.IGNORECASE)[1:]):
        sentence = re.split(r"[.!?](?=\s|$)|\n", segment, maxsplit=1)[0]
        if kind == "number":
            value = _stated_number(sentence)
            if value is not None:
                return repr(value)
            continue
        words = sentence.split()
        if not words:
            continue
        word = words[0].strip("*_`:;.,()[]")
        if kind == "letter":
            word = word.upper() if len(word) == 1 else ""
        try:
            return normalize_gold(dataset, word)
        except ValueError:
            continue
    return None


def _same(dataset: str, pred: str | None, stated: str | None) -> bool:
    if pred is None or stated is None:
        return False
    if answer_kind(dataset) == "number":
        return abs(float(pred) - float(stated)) < 1e-9
    return pred == stated


def check_dataset(name: str, rows: list[dict]) -> dict:
    """Run both checks on one dataset's rows (``output`` as the generation, ``answer`` as gold)."""
    res = {"dataset": name, "kind": answer_kind(name), "rows": len(rows), "bad_gold": 0, "explicit": 0}
    res.update(stated_ok=0, ours=0, theirs=0, protocol_agree=0, stated_misses=[], ours_only=[], theirs_only=[])
    for i, row in enumerate(rows):
        text, gold = row.get("output") or "", str(row["answer"])
        try:
            normalize_gold(name, gold)
        except ValueError:
            res["bad_gold"] += 1
            continue
        stated = stated_answer(name, text)
        if stated is not None or explicit_answer(name, text) is not None:
            res["explicit"] += 1
            if _same(name, extract_answer(name, text), stated):
                res["stated_ok"] += 1
            else:
                res["stated_misses"].append(i)
        ours, theirs = is_correct(name, text, gold), llm_adapters_correct(name, text, gold)
        res["ours"] += ours
        res["theirs"] += theirs
        res["protocol_agree"] += is_correct(name, text, gold, protocol="llm_adapters") == theirs
        if ours != theirs:
            res["ours_only" if ours else "theirs_only"].append(i)
    n = max(res["rows"], 1)
    res["stated_pct"] = 100.0 * res["stated_ok"] / res["explicit"] if res["explicit"] else None
    res["gap_pp"] = 100.0 * (res["ours"] - res["theirs"]) / n
    res["ok"] = ((res["stated_pct"] is None or res["stated_pct"] >= MIN_STATED_PCT) and res["gap_pp"] >= -MAX_GAP_PP
                 and res["protocol_agree"] == res["rows"] - res["bad_gold"])
    return res


def check_dir(data_dir: Path) -> list[dict]:
    """Check every ``<data_dir>/*/test.json`` (folder names are dataset names or aliases)."""
    results = []
    for path in sorted(data_dir.glob("*/test.json"), key=lambda p: p.parent.name.lower()):
        with open(path, encoding="utf-8") as f:
            results.append(check_dataset(path.parent.name, json.load(f)))
    return results


def format_table(results: list[dict]) -> str:
    """Markdown table, one row per dataset."""
    lines = [
        "| dataset | kind | rows | explicit | stated=ours | ours correct | LLM-Adapters correct | gap (pp) "
        "| llm_adapters=theirs | ok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        pct = "n/a" if r["stated_pct"] is None else f"{r['stated_pct']:.2f}%"
        lines.append(
            f"| {r['dataset']} | {r['kind']} | {r['rows']} | {r['explicit']} | {pct} | {r['ours']} "
            f"| {r['theirs']} | {r['gap_pp']:+.2f} | {r['protocol_agree']} | {'yes' if r['ok'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--show", type=int, default=0, help="print up to N differing rows per dataset")
    args = parser.parse_args(argv)
    results = check_dir(args.data_dir)
    if not results:
        print(f"no */test.json under {args.data_dir}", file=sys.stderr)
        return 1
    print(format_table(results))
    for r in results:
        if r["bad_gold"]:
            print(f"{r['dataset']}: {r['bad_gold']} rows with an unreadable gold answer skipped")
        for key in ("stated_misses", "ours_only", "theirs_only"):
            if r[key]:
                shown = ", ".join(map(str, r[key][: max(args.show, 10)]))
                print(f"{r['dataset']} {key} ({len(r[key])}): {shown}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
