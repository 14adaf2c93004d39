"""``python -m moelora_lit lm-eval``: lm-evaluation-harness on the model ``test`` builds, with the shipped offline
task YAMLs; on the same rows and prompt our log-likelihood scorer and the harness pick the same options."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_loglik import SMOKE, TINY, arc_rows

from moelora_lit.__main__ import main
from moelora_lit.eval.choices import harness_requests, parse_question
from moelora_lit.eval.loglik import picks, score_questions
from moelora_lit.models.loading import load_base_model, load_tokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                reason="lm-eval is not installed (pip install -e .[eval])")


def run_lm_eval(tmp_path: Path, *args: str) -> int:
    try:
        main(["lm-eval", "--config", str(SMOKE), "--model.base_model", TINY, "--output_dir", str(tmp_path / "out"),
              "--trainer.enable_progress_bar", "false", *args])
    except SystemExit as exit_:
        return int(exit_.code)
    raise AssertionError("main() did not exit")


def test_harness_and_our_scorer_pick_the_same_options(tmp_path: Path) -> None:
    rows = arc_rows(60, seed=1)
    path = tmp_path / "arc.json"
    path.write_text(json.dumps(rows))
    assert run_lm_eval(tmp_path, "--tasks", "moelora_arc_easy", "--data", f"moelora_arc_easy={path}",
                       "--log_samples") == 0
    run = tmp_path / "out" / "version_0"
    results = json.loads((run / "results.json").read_text())
    harness = results["results"]["moelora_arc_easy"]
    assert results["moelora"]["data_files"] == {"moelora_arc_easy": str(path.resolve())}
    samples = sorted((json.loads(line) for line in (run / "samples_moelora_arc_easy.jsonl").read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    assert len(samples) == 60 and (run / "tasks" / "moelora_piqa.yaml").is_file()

    # ours, on the same base (the smoke adapter is freshly initialised: lora_B = 0, so the model equals its base)
    tok = load_tokenizer(TINY)
    questions = [parse_question("arc_e", r["instruction"], r["answer"]) for r in rows]
    requests = [harness_requests(q) for q in questions]
    ours = score_questions(load_base_model(TINY).eval(), tok, requests)
    same = same_norm = 0
    for s, r, lls in zip(samples, requests, ours, strict=True):
        theirs = [resp[0] for resp in s["filtered_resps"]]
        assert [a[0] for a in s["arguments"]] == list(r.contexts) and [a[1] for a in s["arguments"]] == list(
            r.continuations)
        assert lls == pytest.approx(theirs, abs=1e-3)
        pick, pick_norm = picks(lls, r.norm_lengths)
        same += pick == picks(theirs, r.norm_lengths)[0]
        same_norm += pick_norm == picks(theirs, r.norm_lengths)[1]
    assert same >= 0.99 * 60 and same_norm >= 0.99 * 60
    acc = sum(picks(lls, r.norm_lengths)[0] == r.gold for lls, r in zip(ours, requests, strict=True)) / 60
    acc_norm = sum(picks(lls, r.norm_lengths)[1] == r.gold for lls, r in zip(ours, requests, strict=True)) / 60
    assert abs(acc - harness["acc,none"]) <= 0.005 and abs(acc_norm - harness["acc_norm,none"]) <= 0.005


def test_lm_eval_refuses_bad_data_before_building_the_model(tmp_path: Path, capsys) -> None:
    assert run_lm_eval(tmp_path, "--tasks", "moelora_arc_easy", "--data", "arc=/nowhere.json") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data 'arc=/nowhere.json'" in err and "moelora_arc_easy" in err
