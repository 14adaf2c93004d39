"""The built-in synthetic suite and the embedded tiny base model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moelora_lit.data.synthetic import SPLITS, SYNTHETIC_TASKS, computation_key, effective_n, split_of, synthetic_rows

ASSET = Path(__file__).resolve().parents[1] / "moelora_lit" / "assets" / "tiny-base"
FACT = re.compile(r"(\d+) (plus|minus|times) (\d+) is (\d+)\.")


def test_families() -> None:
    assert len(SYNTHETIC_TASKS) >= 4
    assert all(name.startswith("synth_") for name in SYNTHETIC_TASKS)
    assert "synth_all" not in SYNTHETIC_TASKS


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_rows_are_deterministic_and_seeded(name: str) -> None:
    assert synthetic_rows(name, "train", 50) == synthetic_rows(name, "train", 50)
    assert synthetic_rows(name, "train", 50, seed=1) != synthetic_rows(name, "train", 50)
    assert len(synthetic_rows(name, "validation")) == 100


def _computations(name: str, row: dict[str, str]) -> set[tuple]:
    """What a row computes, read from its text alone, each in a normal form shared by its equivalent forms:
    every arithmetic fact of the chain of thought (operands sorted: commuted forms match), the compared pair,
    the looked-up statement, and the question's numbers as a multiset (for the computing families)."""
    out = {(op, min(int(x), int(y)), max(int(x), int(y))) for x, op, y, _ in FACT.findall(row["output"])}
    out |= {("larger", int(lo), int(hi)) for hi, lo in re.findall(r"(\d+) is larger than (\d+)", row["output"])}
    out |= {("has", *m) for m in re.findall(r"So (\w+) has (\d+) (\w+)", row["output"])}
    if name == "synth_units":  # k of a unit: the same question whatever the wording
        out |= {("question", int(k), unit) for k, unit in re.findall(r"in (\d+) (\w+)\?", row["instruction"])}
    elif name != "synth_lookup":
        out.add(("question", name, *sorted(int(n) for n in re.findall(r"\d+", row["instruction"]))))
    return out


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_test_computations_are_held_out(name: str) -> None:
    """No test computation (equation, commuted or equivalent form, chain-of-thought fact) is in any fine-tuning
    or validation row, whatever the seed; validation is disjoint from training too."""
    train = [r for seed in (0, 1, 7) for r in synthetic_rows(name, "train", seed=seed)]
    validation = synthetic_rows(name, "validation", seed=3)
    test = synthetic_rows(name, "test", seed=2) + synthetic_rows(name, "test", 50)
    seen = {split: set().union(*(_computations(name, r) for r in rows))
            for split, rows in (("train", train), ("validation", validation), ("test", test))}
    assert seen["test"] and not seen["test"] & seen["train"]
    assert not seen["test"] & seen["validation"]
    assert not seen["validation"] & seen["train"]
    for split_rows in (train[:2000], validation, test[:200]):  # no duplicate questions inside one draw
        assert len({r["instruction"] for r in split_rows}) == len(split_rows)


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_fifty_distinct_test_computations(name: str) -> None:
    """At the quickstart's test size (50 per family) every test row is a different computation."""
    rows = synthetic_rows(name, "test", 50)
    assert len({frozenset(_computations(name, r)) for r in rows}) == 50
    assert len({computation_key(name, r) for r in rows}) == effective_n(name, "test", 50) == 50
    for row in rows + synthetic_rows(name, "train", 100):
        assert split_of(name, computation_key(name, row)) in ("test", "train")


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_row_format_and_arithmetic(name: str) -> None:
    for row in synthetic_rows(name, "train", 300) + synthetic_rows(name, "test", 100):
        assert set(row) == {"instruction", "input", "output", "answer"}
        assert row["input"] == ""
        assert row["answer"].isdigit()
        assert row["output"].endswith(f"The answer is {row['answer']}.")
        assert re.findall(r"\d+", row["output"])[-1] == row["answer"]
        facts = FACT.findall(row["output"])
        assert bool(facts) == (name in ("synth_add", "synth_units")), row
        if name == "synth_lookup":  # the stated count is the asked-for person's count in the question
            person = row["instruction"].rsplit(" does ", 1)[1].split(" have")[0]
            assert f"{person} has {row['answer']} " in row["instruction"]
        if name == "synth_compare":
            a, b = map(int, re.findall(r"\d+", row["instruction"]))
            assert int(row["answer"]) == max(a, b)
        for x, op, y, z in facts:  # every step of the chain of thought is true
            assert {"plus": int(x) + int(y), "minus": int(x) - int(y), "times": int(x) * int(y)}[op] == int(z), row


def test_synth_all_mixes_every_family() -> None:
    rows = synthetic_rows("synth_all", "train", 40)
    assert len(rows) == 40
    per_family = {name: synthetic_rows(name, "train", 10) for name in SYNTHETIC_TASKS}
    for family_rows in per_family.values():
        assert all(row in rows for row in family_rows)
    assert len(synthetic_rows("synth_all", "test", 7)) == 7
    assert len(synthetic_rows("synth_all", "test")) == 200 * len(SYNTHETIC_TASKS)


def test_bad_name_or_split() -> None:
    with pytest.raises(ValueError, match="synth_add"):
        synthetic_rows("synth_nope", "train")
    with pytest.raises(ValueError, match="validation"):
        synthetic_rows("synth_add", "dev")
    with pytest.raises(ValueError):
        synthetic_rows("synth_add", "train", -1)


def test_embedded_base_loads_offline_and_generates() -> None:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    assert sum(f.stat().st_size for f in ASSET.iterdir()) <= 20 * 2**20
    tok = transformers.AutoTokenizer.from_pretrained(ASSET, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(ASSET, local_files_only=True)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    text = "Ava has 12 apples and 305 pears. 😀"
    ids = tok(text).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == text  # byte-level: any text round-trips
    assert all(not any(c.isalpha() for c in tok.decode([i])) for i in ids if any(c.isdigit() for c in tok.decode([i])))
    tok.padding_side = "left"
    enc = tok(["7 plus 5 is", "Of 73 and 38, 73 is larger than"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2 and enc.input_ids.shape[1] < out.shape[1] <= enc.input_ids.shape[1] + 4
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert texts[0].startswith(" 12") and texts[1].startswith(" 38")  # a fact it learnt; a copy from context


def test_embedded_base_knows_every_fact_of_the_suite() -> None:
    """Held-out test facts come from pretraining: the base completes (nearly) every fact a chain of thought uses."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    tok = transformers.AutoTokenizer.from_pretrained(ASSET, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(ASSET, local_files_only=True)
    tok.padding_side = "left"
    facts = {f"{x} {op} {y} is": int(z) for name in ("synth_add", "synth_units") for split in SPLITS
             for r in synthetic_rows(name, split) for x, op, y, z in FACT.findall(r["output"])}
    enc = tok(list(facts), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    right = sum(t.strip().startswith(f"{z}.") or t.strip() == str(z) for t, z in zip(texts, facts.values(),
                                                                                      strict=True))
    assert right >= 0.95 * len(facts), (right, len(facts))


def test_chains_of_thought_use_whole_words_of_the_embedded_base() -> None:
    """Every word after the first, up to "The answer is", is one token the base was pretrained on."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(ASSET, local_files_only=True)
    for name in SYNTHETIC_TASKS:
        for row in synthetic_rows(name, "train", 100):
            steps = row["output"].rsplit(" The answer is", 1)[0]
            pieces = [tok.decode([i]) for i in tok(steps, add_special_tokens=False).input_ids]
            words = re.findall(r" ?[^ .,]+|[.,]", steps)[1:]
            assert pieces[-len(words):] == words, (name, steps, pieces)
