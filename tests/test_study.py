"""What the studies rely on: one validation loss per validation set, the routing probe on LLM-Adapters files (its
step-0 state kept across a resume), the shared study machinery's lr grids, grid-key choices and jobs
(:mod:`moelora_lit.analysis.study`), the per-example record, and the SmolLM2 study's routing grid."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hf_folder import build_tiny_hf_folder
from test_module import SMOKE, run_cli, scalars

from moelora_lit import MoELoRAConfig
from moelora_lit.analysis import records, routing
from moelora_lit.analysis.study import Arm, Evaluation, Study, select_lr
from moelora_lit.lightning.module import MoELoRAModule
from moelora_lit.lightning.probe import RoutingProbe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments" / "studies" / "smollm2_commonsense"))
import driver as smollm2  # noqa: E402

ROWS = {"arc_e": [{"instruction": f"Which is bigger, {i} or {i + 1}?\n\nAnswer format: answer1/answer2",
                   "input": "", "output": "the correct answer is answer2", "answer": "answer2"} for i in range(12)],
        "boolq": [{"instruction": f"Is {i} even?\n\nAnswer format: true/false", "input": "",
                   "output": f"the correct answer is {str(i % 2 == 0).lower()}", "answer": str(i % 2 == 0).lower()}
                  for i in range(12)]}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_hf_folder(tmp_path_factory.mktemp("tiny-base"))


def test_several_validation_sets_log_one_loss_each(tiny_base: str, tmp_path: Path) -> None:
    run_cli(["fit", "--config", SMOKE, "--model.base_model", tiny_base, "--trainer.default_root_dir", str(tmp_path),
             "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--test_after_fit=false",
             "--model.generate_on_validation=false",
             "--data.val=[{name: synth_add, split: validation, limit: 4}, "
             "{name: synth_units, split: validation, limit: 4, alias: units}]"])
    (run,) = (tmp_path / "lightning_logs").iterdir()
    tags = scalars(run)
    assert {"val/loss/synth_add", "val/loss/units"} <= set(tags) and "val/loss" not in tags
    assert tags["val/loss/synth_add"] != tags["val/loss/units"]


def test_probe_reads_files_and_keeps_its_step0_state_on_resume(tiny_base: str, tmp_path: Path) -> None:
    files = {}
    for name, rows in ROWS.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(rows))
    probe = RoutingProbe(limit=4, permutations=20, batch_size=3,
                         data=[{"name": n, "path": str(p), "offset": 8} for n, p in files.items()])
    assert probe.tasks == ["arc_e", "boolq"]
    texts, labels = probe._texts()
    assert len(texts) == 8 and sorted(labels.tolist()) == [0] * 4 + [1] * 4
    assert any("Which is bigger, 8 or 9?" in t for t in texts) and not any("bigger, 7 or" in t for t in texts)
    module = MoELoRAModule(base_model=tiny_base, adapter=MoELoRAConfig(r=8, num_experts=4, top_k=2))
    module.configure_model()
    loads, entropy, names = probe.measure(module)
    assert loads.shape == (8, len(names), 4) and entropy.shape == (len(names),)
    probe.on_train_start(SimpleNamespace(global_step=0), module)
    resumed = RoutingProbe(limit=4, permutations=20, data=probe.data)
    resumed.load_state_dict(probe.state_dict())
    resumed.on_train_start(SimpleNamespace(global_step=5), None)  # a resumed run measures nothing at its start
    assert resumed.step0 == probe.step0 and probe.step0["examples"] == 8
    with pytest.raises(ValueError, match=r"RoutingProbe data\[0\].*needs 'name' and 'path'"):
        RoutingProbe(data=[{"name": "arc_e", "path": str(tmp_path / "missing.json")}])


def finish(s: Study, variant: str, lr: float, score: float, seed: int = 0) -> None:
    folder = s.run_folder(variant, lr, seed)
    (folder / "adapter").mkdir(parents=True)
    (folder / "train_done.json").write_text(json.dumps({"score": score, "adapter": str(folder / "adapter")}))


def smollm2_study(out: Path, results: Path | None = None) -> Study:
    return smollm2.build(out, results or out / "no-records")


def test_select_lr_needs_a_worse_neighbour_on_both_sides() -> None:
    assert select_lr({1e-3: 0.5, 3e-3: 0.4, 1e-2: 0.45}, higher_is_better=False) == (3e-3, None, True)
    assert select_lr({1e-3: 0.5, 3e-3: 0.4}, higher_is_better=True) == (1e-3, 3e-4, False)
    assert select_lr({3e-2: 0.1, 1e-1: 0.9}, higher_is_better=True) == (1e-1, None, False)  # the ladder ends


def test_grid_extends_until_the_best_lr_has_a_worse_neighbour_each_side(tmp_path: Path) -> None:
    s = smollm2_study(tmp_path)
    lrs = smollm2.ARMS["lora"].lrs
    assert [j.meta["lr"] for j in s.train_jobs() if j.meta["arm"] == "lora"] == list(lrs)
    for lr, loss in zip(lrs, (0.5, 0.6, 0.7), strict=True):
        finish(s, "lora", lr, loss)
    assert s.grid_state("lora", "lora") == ([1e-4], None)          # best at the low edge: one step down
    finish(s, "lora", 1e-4, 0.55)
    assert s.choice("lora") == ("lora", {}, 3e-4)
    jobs = s.train_jobs()
    assert [(j.meta["variant"], j.meta["seed"]) for j in jobs[:2]] == [("lora", 1), ("lora", 2)]  # seeds first
    assert jobs[2].meta["variant"] == "moelora-sum"
    assert "--model.optimizer.init_args.lr=0.0003" in jobs[0].command and "--ckpt_path" not in jobs[0].command


def test_moelora_keeps_the_better_reduction_and_no_contrastive_follows_it(tmp_path: Path) -> None:
    s = smollm2_study(tmp_path)
    lrs = smollm2.ARMS["moelora"].lrs
    for reduction, losses in (("sum", (0.6, 0.5, 0.7)), ("mean", (0.5, 0.4, 0.45))):
        for lr, loss in zip(lrs, losses, strict=True):
            finish(s, f"moelora-{reduction}", lr, loss)
    assert s.choice("moelora") == ("moelora-mean", {smollm2.REDUCTION: "mean"}, 1e-3)
    assert s.choice("moelora_no_contrastive") is None
    variants = {j.meta["variant"] for j in s.train_jobs()}
    assert "moelora_no_contrastive-mean" in variants and "moelora_no_contrastive-sum" not in variants
    job = next(j for j in s.train_jobs() if j.meta["variant"] == "moelora_no_contrastive-mean")
    assert "--model.adapter.aux_reduction=mean" in job.command
    assert job.command[job.command.index("--config") + 1].endswith("smollm2_commonsense/moelora_no_contrastive.yaml")


def test_a_new_study_is_a_table_of_arms(tmp_path: Path) -> None:
    """Arms as data: stacked configs per method, validation accuracy (higher is better), evaluations."""
    arms = {"lora": Arm(("base.yaml", "methods/lora.yaml"), lrs=(1e-3,)),
            "hydralora": Arm(("base.yaml", "methods/hydralora.yaml"), lrs=(1e-3,), overrides=("--x=1",))}
    s = Study(arms, tmp_path, seeds=(0, 1), evaluations=[Evaluation("test", ("--model.scoring=loglikelihood",))])
    jobs = s.train_jobs()
    assert [j.meta["arm"] for j in jobs] == ["lora", "hydralora"]
    cmd = jobs[1].command
    configs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
    assert configs == ["base.yaml", "methods/hydralora.yaml"] and "--x=1" in cmd
    assert s.eval_jobs()[0].label == "eval test zero_shot"


def test_evaluation_commands(tmp_path: Path) -> None:
    s = smollm2_study(tmp_path)
    generate = next(e for e in smollm2.EVALUATIONS if e.name == "generate")
    cmd = s.eval_job("zero_shot", None, tmp_path / "generate", generate, {}, None).command
    assert "test" in cmd and not any(a.startswith("--model.init_adapter") for a in cmd)
    specs = json.loads(next(a for a in cmd if a.startswith("--data.test="))[len("--data.test="):])
    assert [sp["name"] for sp in specs] == ["arc_e", "boolq", "piqa"]
    assert all(sp["limit"] == 200 and sp["path"].startswith("../shared/data/") for sp in specs)
    loglik = smollm2.EVALUATIONS[0]
    cmd = s.eval_job("moelora", 1, tmp_path / "ll", loglik, {smollm2.REDUCTION: "mean"}, "/adapter").command
    assert "--model.init_adapter=/adapter" in cmd and "--model.loglik_prompt=training" in cmd
    assert cmd[cmd.index("--config") + 1].endswith("smollm2_commonsense/moelora.yaml")


def test_committed_records_give_back_choices_and_retrain_a_chosen_run_without_adapter(tmp_path: Path) -> None:
    """A fresh clone: the training record gives back every choice; chosen runs whose evaluations are in the
    per-example record need nothing; with the record of evaluations gone they would be trained again."""
    s = smollm2.build(tmp_path / "runs")
    assert s.choice("lora") == ("lora", {}, 1e-3) and s.choice("moelora")[0] == "moelora-mean"
    assert s.train_jobs() == [] and s.eval_jobs() == []
    bare = Study(smollm2.ARMS, tmp_path / "runs", smollm2.SEEDS, smollm2.METRIC, False, smollm2.EVALUATIONS,
                 record=pd.read_csv(smollm2.RESULTS / "runs.csv"))
    assert {(j.meta["arm"], j.meta["seed"]) for j in bare.train_jobs()} == {
        (a, seed) for a in smollm2.ARMS for seed in smollm2.SEEDS}


def test_record_round_trip_and_paired_summary(tmp_path: Path) -> None:
    rows = []
    for method, seed, correct in [("zero_shot", None, [0] * 20 + [1] * 20)] + [
            ("lora", seed, [1] * 10 + [0] * 10 + [1] * 20) for seed in (0, 1, 2)]:
        path = tmp_path / f"{method}{seed}.jsonl"
        path.write_text("".join(json.dumps({"dataset": "arc_e", "index": i, "pred": c, "pred_norm": c, "gold": 1,
                                            "correct": bool(c), "correct_norm": bool(c), "prompt": "x"}) + "\n"
                                for i, c in enumerate(correct)))
        rows.append(records.from_predictions(path, method, seed, "ll"))
    records.write_record(pd.concat(rows), tmp_path / "r.csv.gz")
    first = (tmp_path / "r.csv.gz").read_bytes()
    record = records.read_record(tmp_path / "r.csv.gz")
    records.write_record(record, tmp_path / "r.csv.gz")
    assert (tmp_path / "r.csv.gz").read_bytes() == first and list(record.columns) == records.COLUMNS
    table = records.accuracy(record)
    assert table.set_index("method").loc["lora", "acc"].tolist() == [0.75] * 3
    (pair,) = records.summarise(record, [("lora", "zero_shot", None)])["paired"]
    assert pair["examples_paired"]["diff"] == pytest.approx(0.25) and pair["examples_paired"]["a_better"] == 10
    assert pair["examples_paired"]["b_better"] == 0 and pair["examples_paired"]["sign_test_p"] < 0.01


def test_routing_grid_puts_each_layer_in_its_block_and_projection() -> None:
    layers = [f"model.layers.{b}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
              for b in range(2) for p in routing.PROJECTIONS]
    base = np.arange(len(layers), dtype=float)

    def summary(shift: float) -> dict:
        state = {"specialisation": base.tolist(), "entropy": (0.69 - 0 * base).tolist()}
        trained = {"specialisation": (base + shift).tolist(), "entropy": (0.69 - shift / 10 + 0 * base).tolist()}
        return {"layers": layers, "step0": state, "trained": trained}

    summaries = {(m, s): summary(shift + s / 100) for m, shift in (("moelora", 1.0), ("moelora_no_contrastive", 0.0))
                 for s in range(3)}
    diffs = routing.differences(summaries)
    spec = diffs[(diffs["quantity"] == "specialisation") & (diffs["comparison"] == "moelora: trained - step0")]
    table = routing.block_grid(spec)
    assert table.shape == (2, 7) and list(table.columns) == routing.PROJECTIONS
    assert np.allclose(table.to_numpy(), 1.01)
    between = diffs[diffs["comparison"] == "moelora - moelora_no_contrastive (trained)"]
    assert np.allclose(between[between["quantity"] == "specialisation"]["diff"], 1.0)
    assert np.allclose(between[between["quantity"] == "entropy"]["diff"], -0.1)
    overall = routing.layer_summary(diffs, summaries).set_index(["quantity", "comparison", "projection"])
    row = overall.loc[("specialisation", "moelora: trained - step0", "all")]
    assert row["layers"] == 14 and row["seeds"] == 3 and row["mean_diff"] == pytest.approx(1.01)
    assert row["low"] == pytest.approx(1.0 - 0.01 * 4.303 / 3 ** 0.5 + 0.01, abs=1e-3) and row["p"] < 0.01
    assert overall.loc[("entropy", "moelora - moelora_no_contrastive (trained)", "q_proj"), "mean_diff"] == (
        pytest.approx(-0.1))
