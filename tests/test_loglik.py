"""Log-likelihood multiple-choice scoring (``model.scoring=loglikelihood``): option parsing from LLM-Adapters and
native rows, the batched scorer against a one-sequence-at-a-time reference, and the ``test`` command end to end on
the embedded tiny base (acc / acc_norm / n, predictions, routing statistics, errors before the model loads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from moelora_lit.__main__ import main
from moelora_lit.data.formats import convert_rows
from moelora_lit.eval.choices import harness_requests, parse_question, training_requests
from moelora_lit.eval.loglik import continuation_logliks, encode_pair, picks, score_questions
from moelora_lit.lightning.module import MoELoRAModule

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.yaml"
TINY = str(ROOT / "moelora_lit" / "assets" / "tiny-base")
WORDS = ["red", "blue", "green", "plant", "water", "energy", "sun", "rock", "cell", "heat", "light", "sound",
         "metal", "gas", "liquid", "animal"]


def arc_rows(n: int, seed: int = 0) -> list[dict]:
    """ARC-like rows in LLM-Adapters' format (4 options, gold varying)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = " ".join(rng.choices(WORDS, k=rng.randint(4, 9))).capitalize() + "?"
        options = [" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(4)]
        gold = rng.randrange(4)
        listed = " ".join(f"Answer{i}: {o}" for i, o in enumerate(options, 1))
        rows.append({"instruction": f"Please choose the correct answer to the question: {question}\n\n{listed}\n\n"
                                    "Answer format: answer1/answer2/answer3/answer4", "input": "",
                     "output": f"the correct answer is answer{gold + 1}", "answer": f"answer{gold + 1}"})
    return rows


def test_options_parse_from_llm_adapters_and_native_rows() -> None:
    q = parse_question("arc_e", arc_rows(1)[0]["instruction"], "answer3")
    assert len(q.options) == 4 and q.gold == 2 and q.question.endswith("?")
    native = {
        "piqa": {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
        "siqa": {"context": "Kai ran.", "question": "Why?", "answerA": "late", "answerB": "fun", "answerC": "x",
                 "label": "2"},
        "hellaswag": {"ctx": "A man sits", "activity_label": "Sitting", "endings": ["a", "b [title] c", "d", "e"],
                      "label": "3"},
        "winogrande": {"sentence": "Ann gave Bea a gift because _ was kind.", "option1": "Ann", "option2": "Bea",
                       "answer": "1"},
        "arc_c": {"question": "Why?", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
                  "answerKey": "C"},
        "aqua": {"question": "2+2?", "options": ["A)3", "B)4", "C)5"], "correct": "B", "rationale": "2+2=4"},
        "boolq": {"question": "is the sky blue", "passage": "The sky.", "answer": True},
    }
    expect = {"piqa": (("Twist the lid.", "Eat the lid."), 0), "siqa": (("late", "fun", "x"), 1),
              "hellaswag": (("a", "b [title] c", "d", "e"), 3), "winogrande": (("Ann", "Bea"), 0),
              "arc_c": (("x", "y", "z"), 2), "aqua": (("3", "4", "5"), 1), "boolq": (("no", "yes"), 1)}
    for task, row in native.items():
        (converted,) = convert_rows([row], "fixture", "data.test[0]")
        q = parse_question(task, converted["instruction"], converted["answer"])
        assert (q.options, q.gold) == expect[task], task
    wino = parse_question("winogrande", convert_rows([native["winogrande"]], "f", "k")[0]["instruction"], "option2")
    r = harness_requests(wino)  # partial scoring: the option fills the blank, the rest is shared
    assert r.contexts == ("Ann gave Bea a gift because Ann", "Ann gave Bea a gift because Bea")
    assert r.continuations == (" was kind.",) * 2 and r.gold == 1
    hella = harness_requests(parse_question("hellaswag", convert_rows([native["hellaswag"]], "f", "k")[0]
                                            ["instruction"], "ending1"))
    assert hella.contexts[0] == "Sitting: A man sits" and hella.continuations[1] == " b. c"
    boolq = harness_requests(parse_question("boolq", convert_rows([native["boolq"]], "f", "k")[0]["instruction"],
                                            "true"))
    assert boolq.contexts[0] == "Question: is the sky blue?\nAnswer:" and boolq.continuations == (" no", " yes")
    trained = training_requests(q, "PROMPT")
    assert trained.continuations == ("the correct answer is false", "the correct answer is true")


@pytest.mark.parametrize("instruction, answer, message", [
    ("Please choose the correct answer to the question: Why?\n\nAnswer format: answer1/answer2", "answer1",
     "no numbered options"),
    ("Q?\n\nAnswer1: a Answer3: b", "answer1", "no numbered options"),
    ("Q?\n\nAnswer1: a Answer2: b", "answer5", "not one of"),
])
def test_unreadable_options_are_refused(instruction: str, answer: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_question("arc_e", instruction, answer)


def test_encode_pair_moves_trailing_space_as_the_harness() -> None:
    from moelora_lit.models.loading import load_tokenizer

    tok = load_tokenizer(TINY)
    ctx, cont = encode_pair(tok, "Question: why?\nAnswer: ", "red")
    assert ctx == tok("Question: why?\nAnswer:")["input_ids"]
    assert ctx + cont == tok("Question: why?\nAnswer: red")["input_ids"]


def test_batched_scores_equal_one_sequence_at_a_time() -> None:
    """Left padding, position ids and scoring only the continuation positions change nothing."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(3, 128, (int(c),), generator=g).tolist(), torch.randint(3, 128, (int(k),),
              generator=g).tolist()) for c, k in zip(torch.randint(1, 12, (7,), generator=g),
                                                    torch.randint(1, 6, (7,), generator=g), strict=True)]
    batched = continuation_logliks(model, pairs, pad_token_id=0)
    for i, (ctx, cont) in enumerate(pairs):
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1)    # (T, V)
        ref = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert batched[i].item() == pytest.approx(ref, abs=1e-4)
    assert picks([-3.0, -2.0, -2.0], [1, 1, 10]) == (1, 2)  # acc: ties to the first; acc_norm: per character


def test_shared_context_and_chunks_give_the_same_scores() -> None:
    """The context computed once (KV cache repeated per option) equals each option's full sequence, in any chunking;
    WinoGrande's different contexts take the full-sequence path in the same call."""
    from moelora_lit.models.loading import load_tokenizer

    tok = load_tokenizer(TINY)
    model = tiny_llama(vocab_size=len(tok))
    requests = [harness_requests(parse_question("arc_e", r["instruction"], r["answer"])) for r in arc_rows(6)]
    requests.append(harness_requests(parse_question("winogrande", "Please choose the correct answer to fill in the "
                                                    "blank to complete the given sentence: Ann met Bo so _ smiled. "
                                                    "Option1: Ann Option2: Bo Answer format: option1/option2",
                                                    "option2")))
    full = score_questions(model, tok, requests, shared_prefix=False)
    for kwargs in ({"max_sequences": 64}, {"max_sequences": 4}):  # all at once; one question per forward
        shared = score_questions(model, tok, requests, **kwargs)
        for a, b in zip(full, shared, strict=True):
            assert a == pytest.approx(b, abs=1e-4)
    assert requests[-1].contexts[0] != requests[-1].contexts[1] and len(full[-1]) == 2


def _test_args(tmp_path: Path, test: str, *extra: str) -> list[str]:
    return ["test", "--config", str(SMOKE), "--model.base_model", TINY, "--data.test", test,
            "--data.eval_batch_size", "4", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.enable_progress_bar", "false", *extra]


def test_test_command_writes_acc_and_acc_norm(tmp_path: Path) -> None:
    path = tmp_path / "arc.json"
    path.write_text(json.dumps(arc_rows(10)))
    main(_test_args(tmp_path, f"[{{name: arc_c, path: {path}}}, {{name: synth_add, limit: 2}}]",
                    "--model.scoring", "loglikelihood", "--model.max_new_tokens", "2"))
    (run,) = (tmp_path / "run" / "lightning_logs").glob("version_*")
    results = json.loads((run / "test_results.json").read_text())
    arc = results["arc_c"]
    assert arc["scoring"] == "loglikelihood" and arc["loglik_prompt"] == "harness" and arc["n"] == 10
    assert arc["accuracy"] == arc["acc"] and 0 <= arc["acc_norm"] <= 1 and arc["protocol"] == "explicit"
    assert results["synth_add"]["scoring"] == "generate" and "acc_norm" not in results["synth_add"]
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    scored = [r for r in rows if r["dataset"] == "arc_c"]
    assert len(scored) == 10 and all(len(r["loglik"]) == 4 for r in scored)
    assert sum(r["correct"] for r in scored) / 10 == pytest.approx(arc["acc"])
    assert sum(r["correct_norm"] for r in scored) / 10 == pytest.approx(arc["acc_norm"])
    for r in scored:
        assert r["pred"] == max(range(4), key=lambda i: r["loglik"][i])
        assert r["context"].startswith("Question: ") and r["context"].endswith("\nAnswer:")
    # routing statistics saw exactly the real tokens of the forwards: each context once, each option[:-1]
    from moelora_lit.models.loading import load_tokenizer

    tok = load_tokenizer(TINY)
    tokens = sum(len(encode_pair(tok, r["context"], r["continuations"][0])[0]) for r in scored)
    tokens += sum(len(encode_pair(tok, r["context"], c)[1]) - 1 for r in scored for c in r["continuations"])
    routing = json.loads((run / "routing_test.json").read_text())
    assert routing["tokens"]["arc_c"] == tokens


def test_bad_scoring_and_unparseable_row_fail_before_the_model_loads(tmp_path: Path, capsys, monkeypatch) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(_test_args(tmp_path, "[{name: synth_add, limit: 2}]", "--model.scoring", "banana"))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "model.scoring='banana'" in err and "generate, loglikelihood" in err
    rows = arc_rows(3)
    rows[2]["instruction"] = "Please choose the correct answer to the question: Why?\n\nAnswer format: answer1"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    monkeypatch.setattr(MoELoRAModule, "configure_model", lambda self: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        main(_test_args(tmp_path, f"[{{name: arc_e, path: {path}}}]", "--model.scoring", "loglikelihood"))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and str(path) in err and "row 2 (0-based)" in err and "data.test[0]" in err


def test_prompt_default_follows_the_adapter(tmp_path: Path) -> None:
    from moelora_lit.lightning.evaluation import resolve_loglik_prompt

    module = MoELoRAModule(base_model=TINY, scoring="loglikelihood")
    assert resolve_loglik_prompt(module) == "harness"
    module.adapter_trained = True
    assert resolve_loglik_prompt(module) == "training"
    assert resolve_loglik_prompt(MoELoRAModule(base_model=TINY, loglik_prompt="harness")) == "harness"
    with pytest.raises(ValueError, match="model.loglik_prompt='alpaca'"):
        MoELoRAModule(base_model=TINY, loglik_prompt="alpaca")


def styled_rows(tmp_path: Path, response: str, seed: int) -> tuple[list[dict], Path, list[dict]]:
    """(ARC-like rows, their file, the training rows the datamodule makes of them in style ``response``)."""
    from moelora_lit.data import ReasoningDataModule

    rows = arc_rows(6, seed=seed)
    path = tmp_path / "arc.json"
    path.write_text(json.dumps(rows))
    dm = ReasoningDataModule(TINY, train=[{"name": "arc_e", "path": str(path), "response": response}])
    return rows, path, dm.parts["train"][0].rows


def test_option_first_responses_are_trained_and_scored_alike(tmp_path: Path) -> None:
    """``response: option_first`` writes the gold option's text before the closing statement into the training
    rows, and the ``training`` prompt scores every option in that same style (BoolQ keeps its answer words)."""
    rows, path, trained = styled_rows(tmp_path, "option_first", seed=3)
    for raw, row in zip(rows, trained, strict=True):
        q = parse_question("arc_e", raw["instruction"], raw["answer"])
        assert row["output"] == f"{q.options[q.gold]}, so the correct answer is {raw['answer']}"
        assert training_requests(q, "P", "option_first").continuations[q.gold] == row["output"]
    boolq = parse_question("boolq", "Please answer the following question with true or false, question: is it?"
                                    "\n\nAnswer format: true/false", "true")
    assert training_requests(boolq, "P", "option_first").continuations[1] == "the correct answer is true"
    main(_test_args(tmp_path, f"[{{name: arc_e, path: {path}, response: option_first}}]",
                    "--model.scoring", "loglikelihood", "--model.loglik_prompt", "training"))
    (run,) = (tmp_path / "run" / "lightning_logs").glob("version_*")
    scored = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    for r in scored:
        q = parse_question("arc_e", rows[r["index"]]["instruction"], rows[r["index"]]["answer"])
        assert r["continuations"] == [f"{o}, so the correct answer is answer{i}" for i, o in enumerate(q.options, 1)]


@pytest.mark.parametrize("spec, message", [
    ({"name": "gsm8k", "response": "option_first"}, r"data\.train\[0\]\.response='option_first': 'gsm8k' is not"),
    ({"name": "arc_e", "response": "text"}, r"data\.train\[0\]\.response='text': choose one of dataset, option_f"),
    ({"name": "arc_e", "response": "option_first", "bad_row": 1}, r"arc\.json: row 1 \(0-based\): no numbered"),
])
def test_option_first_errors_name_the_key_file_and_row(tmp_path: Path, spec: dict, message: str) -> None:
    from moelora_lit.data import ReasoningDataModule

    rows = arc_rows(3)
    if spec.pop("bad_row", None) is not None:
        rows[1]["instruction"] = "Please choose the correct answer to the question: Why?\n\nAnswer format: answer1"
    if spec["name"] == "gsm8k":
        rows = [{"instruction": "1+1?", "input": "", "output": "The answer is 2", "answer": "2"}]
    path = tmp_path / "arc.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=message):
        ReasoningDataModule(TINY, train=[spec | {"path": str(path)}])


def test_cloze_rows_ask_the_question_alone_and_score_option_texts(tmp_path: Path) -> None:
    """``response: cloze``: the prompt holds the question without its options, the response is the gold option's
    text, and the ``training`` prompt scores each option's text after that prompt (options read from the original
    instruction, kept as ``source_instruction``)."""
    rows, path, trained = styled_rows(tmp_path, "cloze", seed=4)
    for raw, row in zip(rows, trained, strict=True):
        q = parse_question("arc_e", raw["instruction"], raw["answer"])
        assert (row["instruction"], row["output"]) == (q.question, q.options[q.gold])
        assert row["source_instruction"] == raw["instruction"] and "Answer1" not in row["instruction"]
    main(_test_args(tmp_path, f"[{{name: arc_e, path: {path}, response: cloze}}]",
                    "--model.scoring", "loglikelihood", "--model.loglik_prompt", "training"))
    (run,) = (tmp_path / "run" / "lightning_logs").glob("version_*")
    for r in (json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()):
        q = parse_question("arc_e", rows[r["index"]]["instruction"], rows[r["index"]]["answer"])
        assert r["continuations"] == list(q.options) and r["gold"] == q.gold
        assert q.question in r["context"] and "Answer1:" not in r["context"]


def test_cloze_generations_are_matched_to_an_option(tmp_path: Path) -> None:
    from moelora_lit.eval.choices import match_option

    q = parse_question("arc_e", "Please choose the correct answer to the question: Which?\n\nAnswer1: red rock "
                                "Answer2: red Answer3: blue gas\n\nAnswer format: answer1/answer2/answer3", "answer3")
    assert match_option(q, "Blue  gas.\nmore text") == 2        # case, spacing, closing punctuation ignored
    assert match_option(q, "red rock") == 0                     # exact beats the shorter option it begins with
    assert match_option(q, "blue gas is the answer") == 2       # begins with one option only
    assert match_option(q, "red rocks and red") is None         # begins with two options: undecided
    assert match_option(q, "green") is None and match_option(q, "\n") is None
    rows = arc_rows(4, seed=5)
    path = tmp_path / "arc.json"
    path.write_text(json.dumps(rows))
    main(_test_args(tmp_path, f"[{{name: arc_e, path: {path}, response: cloze}}]", "--model.max_new_tokens", "3"))
    (run,) = (tmp_path / "run" / "lightning_logs").glob("version_*")
    scored = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(scored) == 4 and all(r["answer_rule"] == "cloze_option" for r in scored)
    for r, raw in zip(scored, rows, strict=True):
        q = parse_question("arc_e", raw["instruction"], raw["answer"])
        option = match_option(q, r["generation"])
        assert r["gold"] == raw["answer"] and r["correct"] == (option == q.gold)
        assert r["extracted"] == (None if option is None else q.labels[option])
