"""Built-in synthetic reasoning suite: four small word-problem families, one skill each, with held-out problems.

Rows use the LLM-Adapters format (`instruction`, `input`, `output`, `answer`, like math_10k): a question,
a short chain of thought in the same sentences the embedded tiny base (`scripts/build_tiny_base.py`)
was pretrained on, and "The answer is N.". The base never saw the question / chain-of-thought /
"The answer is" format, so the adapter has to learn to map a question onto the right building blocks.

- ``synth_lookup``:  find one person's count among three (in-context retrieval): "So Ava has 36 beads."
- ``synth_add``:     a one-step addition word problem, both numbers 1-19 (copy + addition fact).
- ``synth_units``:   unit conversion, "How many days are in 13 weeks?" (unit fact + times fact, 2-24 units).
- ``synth_compare``: the larger of two two-digit numbers (copy + comparison): "Of 51 and 24, 51 is larger
  than 24."
- ``synth_all``:     the four families interleaved.

**Held-out problems.** Every problem has a *computation key*: the computation it tests, in a form shared by all
its equivalent forms, which also fixes every number-bearing step of its chain of thought:

- lookup: (asked person, count, item), i.e. the chain of thought "So Ava has 36 beads.";
- add: the unordered pair {a, b} ("3 plus 5" and "5 plus 3" are one computation);
- units: the times fact as an unordered pair: "8 times 12 is 96." is one computation whether it converts feet or
  dozens, and "2 times 4" (2 gallons) is the commuted form of "4 times 2" (4 pints);
- compare: the unordered pair {a, b}.

The partition into train / validation / test is a function of the key only (never of the seed or the wording),
so no test computation, none of its commuted or equivalent forms and none of its chain-of-thought facts appears
in any fine-tuning or validation row. The unit definitions ("A week is 7 days.", 8 of them) are constants of the
family, like the word "plus", and appear in every split. Families with few computations (add: 190 keys, units:
154) are split exactly by hash rank (45% train, 20% validation, 35% test); the large ones (lookup, compare) by
hash bucket in the same proportions. Evaluation splits visit each of their keys once before any repeats (add has
67 test keys, units 54), so the quickstart's 50 test rows per family are 50 distinct computations:
:func:`effective_n` counts them.

The chains of thought use only words the base was pretrained on, in its own sentence forms. A word the base
never saw is spelled out of rare byte tokens whose output embeddings were never trained, and a tiny base
cannot put more than a few percent of probability on them however the adapter steers it. Two exceptions:
"The answer is", which the format requires, and ``synth_lookup``'s line-initial "So" (the base saw " So" only
mid-line, so it is two byte tokens); greedy decoding still writes both, because nothing else competes there.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations_with_replacement

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
    ("pint", "pints", "cups", 2),
    ("yard", "yards", "feet", 3),
    ("gallon", "gallons", "quarts", 4),
    ("nickel", "nickels", "cents", 5),
    ("week", "weeks", "days", 7),
    ("dime", "dimes", "cents", 10),
    ("foot", "feet", "inches", 12),
    ("dozen", "dozen", "eggs", 12),
)
ADD_RANGE = range(1, 20)     # both addends of synth_add; the base learnt "a plus b is c." for a, b in 0..19
UNIT_COUNTS = range(2, 27)   # k of synth_units; the base learnt "k times f is p." for k in 1..26
FACTORS = tuple(sorted({u[3] for u in UNITS}))
LOOKUP_COUNTS = range(2, 61)
SPLITS = ("train", "validation", "test")
SHARES = {"train": 0.45, "validation": 0.20, "test": 0.35}
DEFAULT_SIZES = {"train": 2000, "validation": 100, "test": 200}  # rows per family when limit=None

Key = tuple
Problem = tuple[str, str, int]  # (question, chain of thought, answer)


@dataclass(frozen=True)
class Family:
    """One family: how to draw a computation key, how to render it as a problem, and (if few) all its keys."""

    sample_key: Callable[[random.Random], Key]
    render: Callable[[Key, random.Random], Problem]
    all_keys: tuple[Key, ...] | None = None


def _lookup_render(key: Key, rng: random.Random) -> Problem:
    name, count, item = key
    others = rng.sample([n for n in NAMES if n != name], 2)
    names = [*others]
    k = rng.randrange(3)
    names.insert(k, name)
    counts = [count if i == k else rng.choice(LOOKUP_COUNTS) for i in range(3)]
    q = (f"{names[0]} has {counts[0]} {item}, {names[1]} has {counts[1]} {item} and {names[2]} has "
         f"{counts[2]} {item}. How many {item} does {name} have?")
    return q, f"So {name} has {count} {item}.", count


def _add_render(key: Key, rng: random.Random) -> Problem:
    a, b = key if rng.random() < 0.5 else key[::-1]
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
    return q, f"{name} has {a} {item} and buys {b} more. {a} plus {b} is {a + b}.", a + b


def _units_render(key: Key, rng: random.Random) -> Problem:
    factor, k = rng.choice([(f, k) for f, k in (key, key[::-1]) if f in FACTORS and k in UNIT_COUNTS])
    one, many, small, _ = rng.choice([u for u in UNITS if u[3] == factor])
    asks = rng.choice(("wants to know", "asks", "wonders"))
    q = f"{rng.choice(NAMES)} {asks}: how many {small} are in {k} {many}?"
    return q, f"A {one} is {factor} {small}. {k} times {factor} is {k * factor}.", k * factor


def _compare_render(key: Key, rng: random.Random) -> Problem:
    lo, hi = key
    a, b = (lo, hi) if rng.random() < 0.5 else (hi, lo)
    return f"Of {a} and {b}, which number is larger?", f"Of {a} and {b}, {hi} is larger than {lo}.", hi


_FAMILIES: dict[str, Family] = {
    "synth_lookup": Family(lambda rng: (rng.choice(NAMES), rng.choice(LOOKUP_COUNTS), rng.choice(ITEMS)),
                           _lookup_render),
    "synth_add": Family(lambda rng: (), _add_render, tuple(combinations_with_replacement(ADD_RANGE, 2))),
    "synth_units": Family(lambda rng: (), _units_render,
                          tuple(sorted({(min(f, k), max(f, k)) for f in FACTORS for k in UNIT_COUNTS}))),
    "synth_compare": Family(lambda rng: tuple(sorted(rng.sample(range(10, 100), 2))), _compare_render),
}
SYNTHETIC_TASKS: tuple[str, ...] = tuple(_FAMILIES)


def _hash(name: str, key: Key) -> int:
    return int.from_bytes(hashlib.sha256(f"{name}:{key}".encode()).digest()[:8], "big")


def _split_by_share(position: float) -> str:
    """The split of a position in [0, 1): test first, then validation, then train."""
    if position < SHARES["test"]:
        return "test"
    return "validation" if position < SHARES["test"] + SHARES["validation"] else "train"


def split_keys(name: str) -> dict[str, tuple[Key, ...]] | None:
    """All keys of a small family per split (exact shares by hash rank); None for the large families."""
    family = _FAMILIES[name]
    if family.all_keys is None:
        return None
    ranked = sorted(family.all_keys, key=lambda k: _hash(name, k))
    out: dict[str, list[Key]] = {s: [] for s in SPLITS}
    for i, key in enumerate(ranked):
        out[_split_by_share(i / len(ranked))].append(key)
    return {s: tuple(sorted(v)) for s, v in out.items()}


def split_of(name: str, key: Key) -> str:
    """The partition a computation key belongs to: a function of the family and key, never of the seed."""
    keys = split_keys(name)
    if keys is not None:
        return next(s for s, ks in keys.items() if key in ks)
    return _split_by_share((_hash(name, key) % 10_000) / 10_000)


def _family_rows(name: str, split: str, limit: int, seed: int) -> list[dict[str, str]]:
    family = _FAMILIES[name]
    rng = random.Random(f"{name}/{split}/{seed}")  # str seeds are hashed with sha512: stable across runs
    pool = None if family.all_keys is None else list(split_keys(name)[split])
    rows: list[dict[str, str]] = []
    seen_questions: set[str] = set()
    seen_keys: set[Key] = set()
    queue: list[Key] = []
    for _ in range(1000 * limit + 1000):
        if len(rows) == limit:
            break
        if pool is not None and split != "train":  # every key once (shuffled), then again, ...
            if not queue:
                queue = rng.sample(pool, len(pool))
            key = queue.pop()
        elif pool is not None:
            key = rng.choice(pool)
        else:
            key = family.sample_key(rng)
            if split_of(name, key) != split or (split != "train" and key in seen_keys):
                continue
        question, steps, answer = family.render(key, rng)
        if question in seen_questions:
            continue
        seen_questions.add(question)
        seen_keys.add(key)
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


def computation_key(name: str, row: dict[str, str]) -> Key:
    """The computation key of a generated row, read back from its chain of thought (see the module docstring)."""
    words = row["output"].replace(".", " ").replace(",", " ").split()
    numbers = [int(w) for w in words if w.isdigit()]
    if name == "synth_lookup":
        return words[1], numbers[0], words[4]
    if name == "synth_units":
        k, factor = numbers[-4], numbers[-3]  # "... k times factor is p. The answer is p."
        return min(k, factor), max(k, factor)
    a, b = (numbers[2], numbers[3]) if name == "synth_add" else (numbers[0], numbers[1])  # "{a} plus {b}"
    return min(a, b), max(a, b)


def effective_n(name: str, split: str = "test", limit: int = 50, seed: int = 0) -> int:
    """Distinct computations among the first ``limit`` rows of a family's split (the n that an accuracy rests on)."""
    return len({computation_key(name, row) for row in synthetic_rows(name, split, limit, seed)})
