"""The reproduction path of experiments/README.md, scaled down to the CPU: ``data prepare`` on a fixture folder in
LLM-Adapters' layout, ``fit`` with the real ``llama7b_math_moelora.yaml`` (tiny base, a few steps), then ``report``.
It exercises what the LLaMA-7B runs rely on: the prepared file layout, the 120-row-style validation split, the
linear decay whose length ScheduleHorizon sets, the best val/loss checkpoint tested, 4 beams and LLM-Adapters'
answer rules recorded in test_results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_folder import build_tiny_hf_folder

from moelora_lit.__main__ import main
from moelora_lit.data.prepare import git_blob_id, prepare, wanted_files
from moelora_lit.eval.report import collect, summarise

REPO = Path(__file__).resolve().parents[1]


def _fixture_rows(name: str, n: int) -> list[dict]:
    if "AQuA" in name:
        return [{"instruction": f"Pick {i}. Answer Choices: (A) 1 (B) 2", "input": "", "output": "The answer is A",
                 "answer": "A"} for i in range(n)]
    return [{"instruction": f"What is {i} + 1?", "input": "", "output": f"{i} + 1 = {i + 1}. The answer is {i + 1}",
             "answer": str(i + 1)} for i in range(n)]


def test_prepare_fit_report_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "LLM-Adapters"
    for name in wanted_files(["math"]):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(json.dumps(_fixture_rows(name, 24 if name.startswith("ft-") else 2)))
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("".join(f"{n}\t{git_blob_id(source / n)}\n" for n in wanted_files(["math"])))
    monkeypatch.chdir(tmp_path)  # the configs read data/... relative to the working directory
    prepare(source, "data", ["math"], val_size=4, manifest=manifest)

    base = build_tiny_hf_folder(tmp_path / "base")
    cli = main(["fit", "--config", str(REPO / "experiments" / "llama7b_math_moelora.yaml"), "--model.base_model", base,
                "--model.torch_dtype", "float32", "--model.max_new_tokens", "4", "--trainer.accelerator", "cpu",
                "--trainer.precision", "32-true", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                "--trainer.accumulate_grad_batches", "1", "--data.num_workers", "0",
                "--model.lr_scheduler.init_args.warmup_steps", "2",
                "--trainer.default_root_dir", str(tmp_path / "runs" / "moelora" / "seed0"), "--seed_everything", "0"])
    (scheduler,) = [c.scheduler for c in cli.trainer.lr_scheduler_configs]
    assert type(scheduler).__name__ == "WarmupLinearDecay" and scheduler.total_steps == 4
    assert scheduler.get_last_lr()[0] == 0.0  # decayed to 0 at the last step
    (results_path,) = (tmp_path / "runs").rglob("test_results.json")
    results = json.loads(results_path.read_text())
    assert list(results) == ["gsm8k", "svamp", "aqua", "mawps", "addsub", "multiarith", "singleeq"]
    for entry in results.values():
        assert (entry["protocol"], entry["num_beams"], entry["eval_batch_size"], entry["n"]) == ("llm_adapters", 4,
                                                                                                  1, 2)
        assert Path(entry["checkpoint"]).name.startswith("best-step=")

    rows = summarise(collect([tmp_path / "runs"]))
    assert {r["dataset"] for r in rows} >= {"gsm8k", "mawps", "average"}
    assert all(r["protocol"] == "llm_adapters" for r in rows if r["dataset"] != "average")
