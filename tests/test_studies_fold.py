"""The studies' shared fold into committed records: evaluations' predictions into the per-example record, chosen
runs' routing probes, the commands file."""

from __future__ import annotations

import json
from pathlib import Path

from moelora_lit.analysis import records
from moelora_lit.analysis.study import Arm, Study


def _predictions(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_fold_predictions_adds_runs_and_zero_shot_to_the_record(tmp_path):
    out, record = tmp_path / "runs", tmp_path / "examples.csv.gz"
    _predictions(out / "train/lora-mean/lr0.001/seed2/eval/loglik/v0/predictions.jsonl",
                 [{"dataset": "arc_e", "index": i, "pred": 1, "pred_norm": 0, "gold": 1, "correct": True,
                   "correct_norm": False} for i in range(3)])
    _predictions(out / "zero_shot/eval/loglik/v0/predictions.jsonl",
                 [{"dataset": "arc_e", "index": 0, "pred": 2, "gold": 1, "correct": False}])
    records.fold_predictions(out, record)
    folded = records.read_record(record)
    assert records.evaluated(folded) == {("lora", 2, "loglik"), ("zero_shot", None, "loglik")}
    assert len(folded) == 4 and folded["correct"].sum() == 3
    records.fold_predictions(out, record)                       # folding again changes nothing
    assert records.read_record(record).equals(folded)


def test_fold_predictions_of_nothing_writes_an_empty_record(tmp_path):
    records.fold_predictions(tmp_path / "runs", tmp_path / "examples.csv.gz")
    assert len(records.read_record(tmp_path / "examples.csv.gz")) == 0


def test_commands_are_added_once_without_a_resumed_attempts_checkpoint(tmp_path):
    path = tmp_path / "commands.txt"
    records.add_commands(path, ["python -m moelora_lit fit --config a.yaml --ckpt_path x/last.ckpt", ""])
    records.add_commands(path, ["python -m moelora_lit fit --config a.yaml", "python -m moelora_lit test"])
    assert path.read_text() == "python -m moelora_lit fit --config a.yaml\npython -m moelora_lit test\n"
    records.add_commands(path, [])
    assert path.read_text().count("\n") == 2


def test_save_probes_keeps_chosen_runs_probes_without_per_task_use(tmp_path, monkeypatch):
    study = Study({"lora": Arm(configs=["c.yaml"], lrs=[1e-3])}, tmp_path / "runs", seeds=(0, 1))
    monkeypatch.setattr(Study, "choice", lambda self, arm: ("lora", {}, 1e-3))
    probe = study.run_folder("lora", 1e-3, 1) / "lightning_logs" / "version_0" / "routing_probe.json"
    probe.parent.mkdir(parents=True)
    probe.write_text(json.dumps({"step0": {"use": [1], "js": 0.1}, "trained": {"use": [2], "js": 0.2}}))
    study.save_probes(tmp_path / "routing")
    assert sorted(p.name for p in (tmp_path / "routing").iterdir()) == ["lora_seed1.json"]
    assert json.loads((tmp_path / "routing" / "lora_seed1.json").read_text()) == {"step0": {"js": 0.1},
                                                                                  "trained": {"js": 0.2}}
