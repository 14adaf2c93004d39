"""Built-in synthetic reasoning suite: four small word-problem families, one skill each.

Rows use the LLM-Adapters format (`instruction`, `input`, `output`, `answer`, like math_10k): a question,
a short chain of thought in the same sentences the embedded tiny base (`scripts/build_tiny_base.py`)
was pretrained on, and "The answer is N.". The base never saw the question / chain-of-thought /
"The answer is" format, so the adapter has to learn to map a question onto the right building blocks.

- ``synth_lookup``:  find one person's count among three (in-context retrieval): "So Ava has 36 beads."
- ``synth_add``:     a one-step addition word problem with one-digit numbers (copy + addition fact).
- ``synth_units``:   unit conversion, "How many days are in 3 weeks?" (unit fact + times fact).
- ``synth_compare``: the larger of two two-digit numbers (copy + comparison): "Of 51 and 24, 51 is larger
  than 24."
- ``synth_all``:     the four families interleaved.

The chains of thought use only words the base was pretrained on, in its own sentence forms. A word the base
never saw is spelled out of rare byte tokens whose output embeddings were never trained, and a tiny base
cannot put more than a few percent of probability on them however the adapter steers it ("gets" in an
earlier version of ``synth_add`` was four such tokens). Two exceptions: "The answer is", which the format
requires, and ``synth_lookup``'s line-initial "So" (the base saw " So" only mid-line, so it is two byte
tokens); greedy decoding still writes both, because nothing else competes there.

Rows are deterministic functions of `(name, split, seed)`. Splits are disjoint by construction: each
problem's *numbers* (not its wording) are hashed into a partition (85% train, 5% validation, 10% test),
so a test computation never appears in training, whatever the seed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

NAMES = (
    "Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivy", "Jack", "Kim", "Leo",
    "Mia", "Nora", "Omar", "Pia", "Ravi", "Sam", "Tess", "Uma", "Vic", "Wes", "Zoe",
)  # fmt: skip
ITEMS = (
    "apples", "pears", "plums", "marbles", "stamps", "cards", "pens", "books", "shells",
    "coins", "stickers", "beads", "cookies", "rocks", "toys",
)  # fmt: skip
# (singular, plural, smaller unit, factor)
UNITS = (
    ("week", "weeks", "days", 7),
    ("foot", "feet", "inches", 12),
    ("yard", "yards", "feet", 3),
    ("gallon", "gallons", "quarts", 4),
    ("dozen", "dozen", "eggs", 12),
    ("nickel", "nickels", "cents", 5),
)
SPLITS = ("train", "validation", "test")
DEFAULT_SIZES = {"train": 2000, "validation": 100, "test": 200}  # rows per family when limit=None
_TEST_BUCKETS, _VALIDATION_BUCKETS = range(0, 2), range(2, 3)  # of 20 buckets: 10% test, 5% validation

Problem = tuple[tuple[int, ...], str, str, int]  # (key numbers, question, chain of thought, answer)


def _lookup(rng: random.Random) -> Problem:
    names = rng.sample(NAMES, 3)
    item = rng.choice(ITEMS)
    counts = [rng.randint(2, 60) for _ in names]
    k = rng.randrange(3)
    q = (f"{names[0]} has {counts[0]} {item}, {names[1]} has {counts[1]} {item} and {names[2]} has "
         f"{counts[2]} {item}. How many {item} does {names[k]} have?")
    return (*counts, k), q, f"So {names[k]} has {counts[k]} {item}.", counts[k]


def _add(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
    return (a, b), q, f"{name} has {a} {item} and buys {b} more. {a} plus {b} is {a + b}.", a + b


def _units(rng: random.Random) -> Problem:
    unit = rng.randrange(len(UNITS))
    one, many, small, factor = UNITS[unit]
    k = rng.randint(2, 9)
    asks = rng.choice(("wants to know", "asks", "wonders"))
    q = f"{rng.choice(NAMES)} {asks}: how many {small} are in {k} {many}?"
    return (unit, k), q, f"A {one} is {factor} {small}. {k} times {factor} is {k * factor}.", k * factor


def _compare(rng: random.Random) -> Problem:
    a, b = rng.sample(range(10, 100), 2)
    q = f"Of {a} and {b}, which number is larger?"
    return (min(a, b), max(a, b)), q, f"Of {a} and {b}, {max(a, b)} is larger than {min(a, b)}.", max(a, b)


_FAMILIES: dict[str, Callable[[random.Random], Problem]] = {
    "synth_lookup": _lookup,
    "synth_add": _add,
    "synth_units": _units,
    "synth_compare": _compare,
}
SYNTHETIC_TASKS: tuple[str, ...] = tuple(_FAMILIES)


def split_of(name: str, key: tuple[int, ...]) -> str:
    """The partition a problem belongs to: a hash of its family and numbers, never of the seed."""
    digest = hashlib.sha256(f"{name}:{key}".encode()).digest()
    bucket = int.from_bytes(digest[:4], "big") % 20
    return "test" if bucket in _TEST_BUCKETS else "validation" if bucket in _VALIDATION_BUCKETS else "train"


def _family_rows(name: str, split: str, limit: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(f"{name}/{split}/{seed}")  # str seeds are hashed with sha512: stable across runs
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for _ in range(1000 * limit + 1000):
        if len(rows) == limit:
            break
        key, question, steps, answer = _FAMILIES[name](rng)
        if question in seen or split_of(name, key) != split:
            continue
        seen.add(question)
        output = f"{steps} The answer is {answer}."
        rows.append({"instruction": question, "input": "", "output": output, "answer": str(answer)})
    if len(rows) < limit:
        raise ValueError(f"{name} has fewer than {limit} distinct {split} rows; ask for fewer")
    return rows


def synthetic_rows(name: str, split: str, limit: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Rows of one synthetic family (or ``synth_all``, the families interleaved) in LLM-Adapters format.

    Args:
        name: one of `SYNTHETIC_TASKS` or ``"synth_all"``.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        limit: number of rows (in total for ``synth_all``); default `DEFAULT_SIZES[split]` per family.
        seed: sampling seed; the train/validation/test partition does not depend on it.
    """
    if name != "synth_all" and name not in _FAMILIES:
        raise ValueError(f"unknown synthetic dataset {name!r}; valid: {', '.join((*SYNTHETIC_TASKS, 'synth_all'))}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if name != "synth_all":
        return _family_rows(name, split, DEFAULT_SIZES[split] if limit is None else limit, seed)
    per_family = DEFAULT_SIZES[split] if limit is None else -(-limit // len(SYNTHETIC_TASKS))
    families = [_family_rows(task, split, per_family, seed) for task in SYNTHETIC_TASKS]
    mixed = [row for group in zip(*families, strict=True) for row in group]
    return mixed if limit is None else mixed[:limit]
