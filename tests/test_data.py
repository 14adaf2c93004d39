"""ReasoningDataModule, dataset formats and prompts: fixtures written here, nothing downloads."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moelora_lit.data import DatasetSpec, ReasoningDataModule, build_prompt, convert_rows, detect_format
from moelora_lit.data.batching import LengthGroupedSampler, eval_column
from moelora_lit.data.formats import REGISTRY
from moelora_lit.data.prompts import ALPACA
from moelora_lit.eval.answers import normalize_gold

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters"

MATH = [
    {"instruction": "Tom has 3 apples and buys 4 more. How many apples does he have?", "input": "",
     "output": "3 plus 4 is 7. The answer is 7.", "answer": "7"},
    {"instruction": "A box holds 12 pens. How many pens are in 2 boxes?", "input": "",
     "output": "12 times 2 is 24. The answer is 24.", "answer": "24.0"},
    {"instruction": "Sam had 10 coins and lost 4. How many are left?", "input": "",
     "output": "10 minus 4 is 6. The answer is 6.", "answer": "6"},
    {"instruction": "What is 5 plus 5?", "input": "Think step by step.",
     "output": "The answer is 10.", "answer": "10"},
]  # fmt: skip
BOOLQ = [
    {"instruction": "Please answer the following question with true or false, question: is the sky blue?\n\n"
     "Answer format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"},
]  # fmt: skip

# One row per native hub format: (registry name, row, expected answer, expected instruction or a fragment).
NATIVE = {
    "gsm8k": ("gsm8k", {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
              "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"},
              "72", "Natalia sold 48 clips in April and half as many in May. How many in all?"),
    "svamp": ("svamp", {"ID": "chal-1", "Body": "Each pack costs 76 dollars. There is a discount of 25 dollars",
              "Question": "How much do you pay for a pack?", "Equation": "( 76.0 - 25.0 )", "Answer": 51.0,
              "Type": "Subtraction"}, "51",
              "Each pack costs 76 dollars. There is a discount of 25 dollars How much do you pay for a pack?"),
    "aqua": ("aqua", {"question": "What is 2 + 3?", "options": ["A)4", "B)5", "C)6", "D)7", "E)8"],
             "rationale": "2 + 3 = 5\nAnswer: B", "correct": "B"}, "B",
             "What is 2 + 3? Answer Choices: (A) 4 (B) 5 (C) 6 (D) 7 (E) 8"),
    "boolq": ("boolq", {"question": "do iran and afghanistan speak the same language", "answer": True,
              "passage": "Persian is spoken in Iran and Afghanistan."}, "true",
              "Please answer the following question with true or false, question: do iran and afghanistan speak "
              "the same language?\n\nAnswer format: true/false"),
    "piqa": ("piqa", {"goal": "To boil butter", "sol1": "Pour it onto a plate", "sol2": "Heat it in a pan",
             "label": 1}, "solution2",
             "Please choose the correct solution to the question: To boil butter\n\nSolution1: Pour it onto a "
             "plate\n\nSolution2: Heat it in a pan\n\nAnswer format: solution1/solution2"),
    "siqa": ("siqa", {"context": "Cameron had a barbecue.", "question": "How would Others feel?",
             "answerA": "like attending", "answerB": "bored", "answerC": "a good friend", "label": "1"}, "answer1",
             "Please choose the correct answer to the question: Cameron had a barbecue. How would Others feel?"
             "\n\nAnswer1: like attending Answer2: bored Answer3: a good friend\n\n"
             "Answer format: answer1/answer2/answer3"),
    "hellaswag": ("hellaswag", {"activity_label": "Roof shingle removal", "ctx": "A man is on a roof. he",
                  "endings": ["skis.", "rips tiles off.", "holds a cube.", "pulls up roofing."], "label": "3"},
                  "ending4",
                  "Please choose the correct ending to complete the given sentence: Roof shingle removal: A man is "
                  "on a roof. he\n\nEnding1: skis. Ending2: rips tiles off. Ending3: holds a cube. Ending4: pulls "
                  "up roofing.\n\nAnswer format: ending1/ending2/ending3/ending4"),
    "winogrande": ("winogrande", {"sentence": "Sarah was a better surgeon than Maria so _ got the hard cases.",
                   "option1": "Sarah", "option2": "Maria", "answer": "1"}, "option1",
                   "Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was "
                   "a better surgeon than Maria so _ got the hard cases.\n\nOption1: Sarah Option2: Maria "
                   "Answer format: option1/option2"),
    "arc": ("arc_e", {"id": "M_1", "question": "What makes days shorter?",
            "choices": {"text": ["density", "years", "faster rotation"], "label": ["A", "B", "C"]},
            "answerKey": "C"}, "answer3",
            "Please choose the correct answer to the question: What makes days shorter?\n\nAnswer1: density "
            "Answer2: years Answer3: faster rotation\n\nAnswer format: answer1/answer2/answer3"),
    "obqa": ("obqa", {"id": "7-980", "question_stem": "The sun is responsible for",
             "choices": {"text": ["puppies", "aging", "wilting", "plants sprouting"], "label": ["1", "2", "3", "4"]},
             "answerKey": "4"}, "answer4", "Please choose the correct answer to the question: The sun is responsible"),
    "multiarith": ("multiarith", {"question": "Sam bought 13 and 17 books; 15 were used. How many new?",
                   "final_ans": "15"}, "15", "Sam bought 13 and 17 books; 15 were used. How many new?"),
}  # fmt: skip


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A byte-level BPE tokenizer with <s> prepended and no pad token (the datamodule must use eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    text = [ALPACA, *(r["instruction"] + " " + r["output"] for r in MATH + BOOLQ)]
    tok.train_from_iterator(text * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)
    return str(out)


def write(path: Path, rows: list[dict]) -> str:
    """Write rows as .json (list), .jsonl or .parquet, by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows, indent=1))
    return str(path)


@pytest.fixture
def math_file(tmp_path: Path) -> str:
    return write(tmp_path / "math.json", MATH)


# ----------------------------------------------------------------------------- prompts
def test_alpaca_prompt_is_llm_adapters_wording() -> None:
    assert build_prompt("alpaca", "Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request. \n\n### Instruction:\nQ?\n\n### Response:\n"
    )
    with_input = build_prompt("alpaca", "Q?", "ctx")
    assert with_input.endswith("### Instruction:\nQ?\n\n### Input:\nctx\n\n### Response:\n")
    assert build_prompt("Q: {instruction} {input} {x}\nA:", "hi", "there") == "Q: hi there {x}\nA:"
    assert build_prompt("Q: {instruction}\nA:", "hi", "there") == "Q: hi\n\nthere\nA:"


# ----------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", sorted(NATIVE))
def test_native_format_converts_to_llm_adapters(fmt: str) -> None:
    name, row, answer, instruction = NATIVE[fmt]
    assert detect_format(row)[0] == fmt
    (out,) = convert_rows([row], "fixture", "data.test[0]")
    assert set(out) == {"instruction", "input", "output", "answer"}
    assert out["answer"] == answer and normalize_gold(name, out["answer"]) == answer
    assert out["instruction"].startswith(instruction)
    assert answer in out["output"]


def test_gsm8k_rationale_drops_calculator_annotations() -> None:
    (out,) = convert_rows([NATIVE["gsm8k"][1]], "fixture", "k")
    assert "<<" not in out["output"] and out["output"].endswith("The answer is 72.")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**NATIVE["piqa"][1], "label": 2}, "outside 0..1"),
        ({**NATIVE["hellaswag"][1], "label": ""}, "hidden test labels"),
        ({**NATIVE["arc"][1], "answerKey": "E"}, "not one of the choice labels"),
        ({**NATIVE["boolq"][1], "answer": "maybe"}, "is not a boolean"),
    ],
)
def test_native_format_bad_label(row: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        convert_rows([row], "f.json", "data.test[0]")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
@pytest.mark.parametrize("fmt", ["llm-adapters", "arc", "gsm8k", "winogrande"])
def test_local_files_every_format(tmp_path: Path, tok_dir: str, suffix: str, fmt: str) -> None:
    name, rows = ("gsm8k", MATH) if fmt == "llm-adapters" else (NATIVE[fmt][0], [NATIVE[fmt][1]] * 3)
    path = write(tmp_path / f"data{suffix}", rows)
    dm = ReasoningDataModule(tok_dir, test=[{"name": name, "path": path}])
    (part,) = dm.parts["test"]
    assert len(part.rows) == len(rows) and part.origin == path
    expected = ["7", "24", "6", "10"] if fmt == "llm-adapters" else [NATIVE[fmt][2]] * 3
    assert [r["answer"] for r in part.rows] == expected


def test_shared_llm_adapters_test_sets_load(tok_dir: str) -> None:
    """The real LLM-Adapters test files (when the workspace has them) load under their registry names."""
    folders = {"AddSub": "addsub", "gsm8k": "gsm8k", "MultiArith": "multiarith", "SingleEq": "singleeq",
               "SVAMP": "svamp", "mawps": "mawps", "boolq": "boolq", "piqa": "piqa", "ARC-Easy": "arc_e"}  # fmt: skip
    if not SHARED.is_dir():
        pytest.skip("no shared LLM-Adapters data in this checkout")
    specs = [{"name": folder, "path": str(SHARED / folder)} for folder in folders if (SHARED / folder).is_dir()]
    dm = ReasoningDataModule(tok_dir, test=specs)
    assert dm.test_names == [folders[s["name"]] for s in specs]
    sizes = {"addsub": 395, "gsm8k": 1319, "multiarith": 600, "singleeq": 508, "svamp": 1000, "mawps": 238,
             "boolq": 3270, "piqa": 1838, "arc_e": 2376}  # fmt: skip
    for part in dm.parts["test"]:
        assert len(part.rows) == sizes[part.task], part.task
        assert all(r["answer"] == normalize_gold(part.task, r["answer"]) for r in part.rows)


# ----------------------------------------------------------------------------- sources
def test_folder_path_picks_split_file(tmp_path: Path, tok_dir: str) -> None:
    write(tmp_path / "d" / "train.json", MATH)
    write(tmp_path / "d" / "test.jsonl", MATH[:2])
    dm = ReasoningDataModule(tok_dir, train=[{"name": "gsm8k", "path": str(tmp_path / "d")}],
                             test=[{"name": "gsm8k", "path": str(tmp_path / "d")}])  # fmt: skip
    assert len(dm.parts["train"][0].rows) == 4 and len(dm.parts["test"][0].rows) == 2
    with pytest.raises(FileNotFoundError, match=r"data\.test\[0\]\.path: folder .* has no validation"):
        ReasoningDataModule(tok_dir, test=[{"name": "gsm8k", "path": str(tmp_path / "d"), "split": "validation"}])


def test_hub_path_with_a_local_dataset_folder(tmp_path: Path, tok_dir: str) -> None:
    """The hub code path (datasets.load_dataset), fed a folder laid out like the hub's openai/gsm8k."""
    repo = tmp_path / "gsm8k_repo"
    write(repo / "main" / "test-00000-of-00001.parquet", [NATIVE["gsm8k"][1]] * 5)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: test\n    path: main/test-*\n---\n"
    )
    spec = DatasetSpec("gsm8k", hub_id=str(repo), hub_config="main", limit=3)
    dm = ReasoningDataModule(tok_dir, test=[spec], cache_dir=str(tmp_path / "cache"))
    assert [r["answer"] for r in dm.parts["test"][0].rows] == ["72"] * 3
    assert dm.parts["test"][0].origin.startswith("hub:")


def test_hub_offline_error_tells_to_pass_path(monkeypatch: pytest.MonkeyPatch, tok_dir: str, tmp_path: Path) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"data\.test\[0\]: could not load 'gsm8k' .*set data\.test\[0\]\.path"):
        ReasoningDataModule(tok_dir, test=["gsm8k"], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"'addsub' has no hub copy; set data\.val\[0\]\.path .*LLM-Adapters"):
        ReasoningDataModule(tok_dir, val=["addsub"])


# ----------------------------------------------------------------------------- validation errors
def bad_json(tmp_path: Path) -> str:
    p = tmp_path / "bad.json"
    p.write_text('[\n {"instruction": "q", "answer": "1"},\n {"instruction": "q" "answer": "2"}\n]')
    return str(p)


def bad_jsonl(tmp_path: Path) -> str:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "q", "answer": "1"}\n{"instruction": oops}\n')
    return str(p)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"test": ["gsm8kk"]}, ValueError, r"data\.test\[0\]\.name: unknown dataset 'gsm8kk'; known datasets: math"),
        ({"test": [{"name": "gsm8k", "path": "nope.json"}]}, FileNotFoundError, r"data\.test\[0\]\.path: nope\.json"),
        ({"test": [{"name": "gsm8k", "pth": "x"}]}, ValueError, r"data\.test\[0\]: unknown key\(s\) \['pth'\]"),
        ({"batch_size": 0}, ValueError, r"data\.batch_size must be an integer >= 1"),
        ({"max_length": 1}, ValueError, r"data\.max_length must be an integer >= 2"),
        ({"prompt_template": "vicuna"}, ValueError, r"data\.prompt_template: unknown prompt template 'vicuna'"),
        ({"test": [{"name": "gsm8k", "path": bad_json}]}, ValueError, r"bad\.json: invalid JSON at line 3, column"),
        ({"test": [{"name": "gsm8k", "path": bad_jsonl}]}, ValueError, r"bad\.jsonl: invalid JSON at line 2, column"),
        ({"test": [{"name": "gsm8k", "path": [{"instruction": "q", "answer": "1"}, {"answer": "2"}]}]},
         ValueError, r"rows\.json: row 1 \(0-based\): missing 'instruction'"),
        ({"test": [{"name": "gsm8k", "path": [{"instruction": "q", "answer": ""}]}]},
         ValueError, r"rows\.json: row 0 \(0-based\): missing 'answer'"),
        ({"test": [{"name": "gsm8k", "path": [*MATH, {"instruction": "q", "answer": "answer1"}]}]},
         ValueError, r"rows\.json: row 4 \(0-based\): answer 'answer1' does not fit dataset 'gsm8k' \(expected a n"),
        ({"test": [{"name": "boolq", "path": MATH}]}, ValueError, r"answer '7' does not fit dataset 'boolq'"),
        ({"test": [{"name": "gsm8k", "path": []}]}, ValueError, r"rows\.json has no rows \(empty dataset\)"),
        ({"train": [{"name": "gsm8k", "path": [{"instruction": "q", "output": "", "answer": "1"}]}]},
         ValueError, r"data\.train\[0\]: .*row 0 \(0-based\): empty 'output'"),
        ({"test": ["synth_add", "synth_add"]}, ValueError, r"data\.test\[1\]: display name 'synth_add' is al"),
        ({"test": [{"name": "gsm8k", "limit": 0}]}, ValueError, r"data\.test\[0\]\.limit must be an integer >= 1"),
        ({"test": [{"name": "gsm8k", "path": MATH, "offset": -1}]}, ValueError,
         r"data\.test\[0\]\.offset must be an integer >= 0"),
        ({"test": [{"name": "gsm8k", "path": MATH, "offset": 4}]}, ValueError,
         r"data\.test\[0\]\.offset=4: .*rows\.json has only 4 rows; lower the offset"),
        ({"test": [{"name": "gsm8k", "path": [*MATH, {"instruction": "q", "answer": "x"}], "offset": 2}]},
         ValueError, r"rows\.json: row 4 \(0-based\): answer 'x' does not fit"),
    ],
)  # fmt: skip
def test_config_errors(tmp_path: Path, tok_dir: str, kwargs: dict, error: type, pattern: str) -> None:
    kwargs = copy.deepcopy(kwargs)
    for role in ("train", "test"):
        for spec in kwargs.get(role, []):
            if isinstance(spec, dict) and callable(spec.get("path")):
                spec["path"] = spec["path"](tmp_path)
            elif isinstance(spec, dict) and isinstance(spec.get("path"), list):
                spec["path"] = write(tmp_path / "rows.json", spec["path"])
    with pytest.raises(error, match=pattern):
        ReasoningDataModule(tok_dir, **kwargs)


def test_offset_slices_rows_after_the_skipped_ones(tok_dir: str, math_file: str) -> None:
    """A validation slice of a training file: rows [offset, offset + limit), disjoint from the first `offset`."""
    dm = ReasoningDataModule(tok_dir, train=[{"name": "gsm8k", "path": math_file, "limit": 2}],
                             val=[{"name": "gsm8k", "path": math_file, "offset": 2, "limit": 1, "alias": "held"}],
                             test=[{"name": "gsm8k", "path": math_file, "offset": 1}])  # fmt: skip
    answers = [normalize_gold("gsm8k", r["answer"]) for r in MATH]
    assert [r["answer"] for r in dm.parts["train"][0].rows] == answers[:2]
    assert [r["answer"] for r in dm.parts["val"][0].rows] == answers[2:3]
    assert [r["answer"] for r in dm.parts["test"][0].rows] == answers[1:]
    assert DatasetSpec("gsm8k").offset == 0


def test_tokenizer_errors(tmp_path: Path, math_file: str) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer: .*missing does not exist"):
        ReasoningDataModule(str(tmp_path / "missing"), test=[{"name": "gsm8k", "path": math_file}])
    dm = ReasoningDataModule(None, test=[{"name": "gsm8k", "path": math_file}])
    with pytest.raises(ValueError, match=r"data\.tokenizer is not set"):
        dm.setup("test")


# ----------------------------------------------------------------------------- batches
def test_train_batch_masks_prompt_and_padding(tok_dir: str, math_file: str) -> None:
    dm = ReasoningDataModule(tok_dir, train=[{"name": "gsm8k", "path": math_file}], batch_size=4, max_length=512)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.dtype == labels.dtype == torch.long
    assert ids.shape[0] == 4 and ids.shape[1] == int(mask.sum(1).max())  # padded to the longest row
    tok, eos = dm.tokenizer, dm.tokenizer.eos_token_id
    assert tok.pad_token_id == eos  # fixture has no pad token
    rows = {build_prompt("alpaca", r["instruction"], r["input"]): r["output"] for r in MATH}
    for i in range(4):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()  # right padded
        assert (labels[i, n:] == -100).all() and ids[i, n - 1] == eos and labels[i, n - 1] == eos
        kept = labels[i, :n] != -100
        start = int(kept.nonzero()[0])
        assert not kept[:start].any() and kept[start:].all()
        prompt = tok.decode(ids[i, 1:start])  # skip <s>
        assert prompt in rows and tok.decode(ids[i, start : n - 1]) == rows[prompt]
        assert (labels[i, start:n] == ids[i, start:n]).all()


def test_train_on_inputs_and_truncation(tok_dir: str, math_file: str) -> None:
    dm = ReasoningDataModule(tok_dir, train=[{"name": "gsm8k", "path": math_file}], train_on_inputs=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    real = batch["attention_mask"].bool()
    assert (batch["labels"][real] == batch["input_ids"][real]).all()
    lengths = sorted(len(x) for x in dm._built["train"]["input_ids"])
    cut = lengths[0] + 1  # shorter than every full row
    dm = ReasoningDataModule(tok_dir, train=[{"name": "gsm8k", "path": math_file}], max_length=cut)
    dm.setup("fit")
    assert max(len(x) for x in dm._built["train"]["input_ids"]) <= cut
    prompt_lens = sorted(dm._built["train"]["prompt_len"])
    dm = ReasoningDataModule(tok_dir, train=[{"name": "gsm8k", "path": math_file}], max_length=prompt_lens[1])
    with pytest.warns(UserWarning, match=r"data\.train: \d+ of 4 rows have a prompt of >= data\.max_length"):
        dm.setup("fit")
    assert all(p < prompt_lens[1] for p in dm._built["train"]["prompt_len"])
    dm = ReasoningDataModule(tok_dir, train=[{"name": "gsm8k", "path": math_file}], max_length=prompt_lens[0])
    with pytest.raises(ValueError, match=r"every one of the 4 rows .* raise data\.max_length"):
        dm.setup("fit")


def test_eval_batches_left_pad_prompts(tok_dir: str, tmp_path: Path, math_file: str) -> None:
    boolq = write(tmp_path / "boolq.jsonl", BOOLQ)
    dm = ReasoningDataModule(
        tok_dir, val=[{"name": "gsm8k", "path": math_file, "alias": "math_small", "limit": 3}],
        test=[DatasetSpec("gsm8k", path=math_file), {"name": "boolq", "path": boolq}], eval_batch_size=3,
    )  # fmt: skip
    assert dm.val_names == ["math_small"] and dm.test_names == ["gsm8k", "boolq"]
    assert dm.test_tasks == ["gsm8k", "boolq"] and dm.val_tasks == ["gsm8k"]
    dm.setup("validate")
    (val,) = dm.val_dataloader()
    batch = next(iter(val))
    keys = {"input_ids", "attention_mask", "labels", "prompt_input_ids", "prompt_attention_mask"}
    assert keys | {"dataset", "task", "answer", "prompt", "instruction", "source_instruction", "index",
                   "response"} == set(batch)
    assert batch["dataset"] == ["math_small"] * 3 and batch["answer"] == ["7", "24", "6"]
    assert batch["task"] == ["gsm8k"] * 3 and batch["index"] == [0, 1, 2]
    assert batch["instruction"] == [r["instruction"] for r in MATH[:3]]
    assert batch["source_instruction"] == batch["instruction"] and batch["response"] == ["dataset"] * 3
    by_hand = {k: v for k, v in batch.items() if k not in ("source_instruction", "response")}  # no Collator
    assert eval_column(by_hand, "source_instruction") == batch["instruction"]
    assert eval_column(by_hand, "response") == ["dataset"] * 3 and eval_column(batch, "index") == [0, 1, 2]
    with pytest.raises(KeyError, match="an eval row needs 'answer'"):
        eval_column({k: v for k, v in by_hand.items() if k != "answer"}, "answer")
    pids, pmask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    assert pmask[:, -1].all() and not pmask[:, 0].all()  # LEFT padded, lengths differ
    for i, prompt in enumerate(batch["prompt"]):
        expected = dm.tokenizer(prompt)["input_ids"]
        n = int(pmask[i].sum())
        assert pids[i, -n:].tolist() == expected and (pids[i, :-n] == dm.tokenizer.pad_token_id).all()
        assert batch["input_ids"][i, : len(expected)].tolist() == expected  # teacher-forced text starts with it
        assert (batch["labels"][i, : len(expected)] == -100).all()
    dm.setup("test")
    tests = dm.test_dataloader()
    assert len(tests) == 2 and [len(dl.dataset) for dl in tests] == [4, 1]
    assert next(iter(tests[1]))["answer"] == ["true"]
    assert [len(dl.dataset) for dl in dm.predict_dataloader()] == [4, 1]


def test_no_val_specs_means_no_val_loader(tok_dir: str, math_file: str) -> None:
    dm = ReasoningDataModule(tok_dir, train=[{"name": "gsm8k", "path": math_file}])
    dm.setup("fit")
    assert dm.val_dataloader() == [] and dm.val_names == []
    with pytest.raises(ValueError, match=r"data\.test is empty"):
        dm.setup("test")


def test_synthetic_and_mixed_training_sets(tok_dir: str, tmp_path: Path) -> None:
    mixed = write(tmp_path / "cs.json", [*BOOLQ, {**MATH[0], "answer": "solution1"}])
    dm = ReasoningDataModule(tok_dir, train=["synth_add", {"name": "commonsense_170k", "path": mixed, "limit": 2}],
                             val=[{"name": "synth_compare", "limit": 5}], test=[DatasetSpec("synth_all", limit=8)],
                             batch_size=4)  # fmt: skip
    assert len(dm.parts["val"][0].rows) == 5 and len(dm.parts["test"][0].rows) == 8
    assert dm.parts["val"][0].origin == "synthetic:synth_compare:validation"
    dm.setup("fit")
    assert len(dm._built["train"]) == len(dm.parts["train"][0].rows) + 2
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[0] == 4


def test_group_by_length(tok_dir: str) -> None:
    lengths = [int(x) for x in torch.randint(1, 500, (1000,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(1000))
    spread = [
        max(lengths[j] for j in order[i : i + 8]) - min(lengths[j] for j in order[i : i + 8]) for i in range(0, 1000, 8)
    ]
    assert sum(spread) / len(spread) < 60  # random batches of 8 spread ~390
    sampler.set_epoch(1)
    assert list(sampler) != order
    dm = ReasoningDataModule(tok_dir, train=[{"name": "synth_all", "limit": 40}], group_by_length=True, batch_size=8)
    dm.setup("fit")
    assert sum(b["input_ids"].shape[0] for b in dm.train_dataloader()) == 40


def test_tokenized_cache_dir(tok_dir: str, math_file: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for _ in range(2):
        dm = ReasoningDataModule(tok_dir, test=[{"name": "gsm8k", "path": math_file}], cache_dir=str(cache))
        dm.setup("test")
    assert len(list(cache.glob("tokenized-*.arrow"))) == 1


def test_lightning_loop_maps_dataloader_idx(tok_dir: str, math_file: str) -> None:
    """Lightning runs one eval dataloader per spec; dataloader_idx indexes val_names."""
    import lightning as L

    seen: list[tuple[int, str]] = []

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            return self.w * batch["input_ids"].float().mean()

        def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
            seen.append((dataloader_idx, batch["dataset"][0]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    val = [{"name": "gsm8k", "path": math_file, "alias": "a"}, {"name": "synth_compare", "limit": 2}]
    dm = ReasoningDataModule(tok_dir, train=[{"name": "gsm8k", "path": math_file}], val=val)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")  # fmt: skip
    trainer.fit(Probe(), datamodule=dm)
    assert {(i, dm.val_names[i]) for i in range(2)} == set(seen)
    assert all(name == dm.val_names[i] for i, name in seen)


def test_registry_has_every_paper_dataset() -> None:
    names = {"math_10k", "commonsense_170k", "gsm8k", "svamp", "aqua", "addsub", "multiarith", "singleeq", "mawps",
             "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa", "synth_all"}  # fmt: skip
    assert names <= set(REGISTRY)
    assert REGISTRY["gsm8k"].hub_id == "openai/gsm8k" and REGISTRY["boolq"].eval_split == "validation"
