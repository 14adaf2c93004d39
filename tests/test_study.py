"""What the SmolLM2 common-sense study relies on: one validation loss per validation set, the routing probe on
LLM-Adapters files (its step-0 state kept across a resume), and the driver's lr-grid and reduction choices."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hf_folder import build_tiny_hf_folder
from test_module import SMOKE, run_cli, scalars

from moelora_lit import MoELoRAConfig
from moelora_lit.analysis.probe import RoutingProbe
from moelora_lit.lightning.module import MoELoRAModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import smollm2_study as study  # noqa: E402

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


def finish(s: study.Study, variant: str, lr: float, loss: float, seed: int = 0) -> None:
    folder = s.run_folder(variant, lr, seed)
    (folder / "adapter").mkdir(parents=True)
    (folder / "train_done.json").write_text(json.dumps({"val_loss": loss, "adapter": str(folder / "adapter")}))


def test_grid_extends_until_the_best_lr_has_a_worse_neighbour_each_side(tmp_path: Path) -> None:
    s = study.Study(tmp_path)
    assert s.grid("lora") == (list(study.INITIAL_LRS), None)
    for lr, loss in zip(study.INITIAL_LRS, (0.5, 0.6, 0.7), strict=True):
        finish(s, "lora", lr, loss)
    assert s.grid("lora") == ([1e-4], None)                      # best at the low edge: one step down
    finish(s, "lora", 1e-4, 0.55)
    assert s.grid("lora") == ([], 3e-4) and s.choice("lora") == ("lora", 3e-4)
    tasks, still_open = s.train_tasks()
    assert [(t.variant, t.seed) for t in tasks if t.method == "lora"] == [("lora", 1), ("lora", 2)]
    assert still_open and [t.variant for t in tasks[:3]] == ["lora", "lora", "moelora-sum"]  # seeds, then grids


def test_moelora_keeps_the_better_reduction_and_no_contrastive_follows_it(tmp_path: Path) -> None:
    s = study.Study(tmp_path)
    for reduction, losses in (("sum", (0.6, 0.5, 0.7)), ("mean", (0.5, 0.4, 0.45))):
        for lr, loss in zip(study.INITIAL_LRS, losses, strict=True):
            finish(s, f"moelora-{reduction}", lr, loss)
    assert s.choice("moelora") == ("moelora-mean", 1e-3)
    assert s.choice("moelora_no_contrastive") is None
    variants = {t.variant for t in s.train_tasks()[0]}
    assert "moelora_no_contrastive-mean" in variants and "moelora_no_contrastive-sum" not in variants
    cmd = study.command(next(t for t in s.train_tasks()[0] if t.variant == "moelora_no_contrastive-mean"))
    assert "--model.adapter.aux_reduction=mean" in cmd and cmd[cmd.index("--configs") + 1].endswith(
        "smollm2_commonsense_moelora_no_contrastive.yaml")


def test_routing_grid_puts_each_layer_in_its_block_and_projection() -> None:
    import smollm2_routing as routing

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
    table = routing.grid(spec)
    assert table.shape == (2, 7) and list(table.columns) == routing.PROJECTIONS
    assert np.allclose(table.to_numpy(), 1.01)
    between = diffs[diffs["comparison"] == "moelora - moelora_no_contrastive (trained)"]
    assert np.allclose(between[between["quantity"] == "specialisation"]["diff"], 1.0)
    assert np.allclose(between[between["quantity"] == "entropy"]["diff"], -0.1)
    overall = routing.summary(diffs, summaries).set_index(["quantity", "comparison", "projection"])
    row = overall.loc[("specialisation", "moelora: trained - step0", "all")]
    assert row["layers"] == 14 and row["seeds"] == 3 and row["mean_diff"] == pytest.approx(1.01)
    assert row["low"] == pytest.approx(1.0 - 0.01 * 4.303 / 3 ** 0.5 + 0.01, abs=1e-3) and row["p"] < 0.01
    assert overall.loc[("entropy", "moelora - moelora_no_contrastive (trained)", "q_proj"), "mean_diff"] == (
        pytest.approx(-0.1))


def test_evaluation_commands(tmp_path: Path) -> None:
    scoring = {s[0]: s for s in study.SCORINGS}
    zero = study.Task("zero_shot", "zero_shot", None, None, tmp_path / "generate", scoring["generate"])
    cmd = study.command(zero)
    assert "test" in cmd and not any(a.startswith("--model.init_adapter") for a in cmd)
    specs = json.loads(next(a for a in cmd if a.startswith("--data.test="))[len("--data.test="):])
    assert [s["name"] for s in specs] == ["arc_e", "boolq", "piqa"]
    assert all(s["limit"] == study.GENERATE_LIMIT and Path(s["path"]).name == "test.json" for s in specs)
    trained = study.Task("moelora", "moelora-sum", 1e-3, 1, tmp_path / "ll", scoring["loglikelihood-training"],
                         "/adapter")
    cmd = study.command(trained)
    assert "--model.init_adapter=/adapter" in cmd and "--model.loglik_prompt=training" in cmd
    assert cmd[cmd.index("--config") + 1].endswith("smollm2_commonsense_moelora.yaml")


def fake_eval(folder: Path, correct: dict[str, list[int]], loglik: bool) -> None:
    folder = folder / "lightning_logs" / "version_0"
    folder.mkdir(parents=True)
    results = {d: {"accuracy": float(np.mean(c)), "n": len(c)} | ({"acc": float(np.mean(c)), "acc_norm": 0.5}
                                                                   if loglik else {}) for d, c in correct.items()}
    (folder / "test_results.json").write_text(json.dumps(results))
    rows = [{"dataset": d, "correct": bool(x), "correct_norm": bool(x)} for d, c in correct.items() for x in c]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_rows_and_paired_sanity_check(tmp_path: Path) -> None:
    import smollm2_study_table as table

    s = study.Study(tmp_path / "runs")
    for lr, loss in zip(study.INITIAL_LRS, (0.6, 0.5, 0.7), strict=True):
        finish(s, "lora", lr, loss)
    for seed in (1, 2):
        finish(s, "lora", 1e-3, 0.5, seed)
    for reduction, losses in (("sum", (0.6, 0.5, 0.7)), ("mean", (0.5, 0.4, 0.45))):
        for lr, loss in zip(study.INITIAL_LRS, losses, strict=True):
            finish(s, f"moelora-{reduction}", lr, loss)
    for seed in (1, 2):
        finish(s, "moelora-mean", 1e-3, 0.4, seed)
    zero = [0] * 20 + [1] * 20
    trained = [1] * 10 + [0] * 10 + [1] * 20                        # 10 more right, none lost
    mixture = [1] * 5 + [0] * 15 + [1] * 20                         # 5 of LoRA's gains lost
    for name, scoring, _, _ in study.SCORINGS:
        fake_eval(tmp_path / "runs" / "zero_shot" / "eval" / name, {"arc_e": zero}, scoring != "generate")
        if name != "loglikelihood-harness":
            for seed in study.SEEDS:
                fake_eval(s.run_folder("lora", 1e-3, seed) / "eval" / name, {"arc_e": trained}, scoring != "generate")
    for seed in study.SEEDS:
        fake_eval(s.run_folder("moelora-mean", 1e-3, seed) / "eval" / "loglikelihood-training", {"arc_e": mixture},
                  loglik=True)
    table.write_table(s, tmp_path / "results")
    df = pd.read_csv(tmp_path / "results" / "smollm2_commonsense.csv")
    assert list(df.columns) == table.COLUMNS and len(df) == 3 + 2 * 3 + 3
    assert set(df[df["method"] == "moelora"]["aux_reduction"]) == {"mean"}
    assert set(df[df["method"] == "zero_shot"]["prompt"]) == {"training", "harness"}
    assert df[df["method"] == "lora"]["lr"].eq(1e-3).all() and df["seed"].isna().sum() == 3
    summary = json.loads((tmp_path / "results" / "smollm2_commonsense.json").read_text())
    assert summary["choices"]["lora"]["lr"] == 1e-3
    ll, harness = [x for x in summary["sanity"] if x["scoring"] == "loglikelihood"]
    assert ll["examples_paired"]["diff"] == pytest.approx(0.25) and ll["examples_paired"]["t95"][0] > 0
    assert ll["examples_paired"]["a_better"] == 10 and ll["examples_paired"]["b_better"] == 0
    assert harness["b"] == "zero_shot (harness prompt)" and harness["examples_paired"]["diff"] == pytest.approx(0.25)
    (pair,) = summary["paired"]
    assert (pair["a"], pair["b"]) == ("moelora", "lora") and pair["examples_paired"]["diff"] == pytest.approx(-0.125)
    assert pair["examples_paired"]["b_better"] == 5 and pair["seeds_paired"]["n"] == 3
    md = (tmp_path / "results" / "smollm2_commonsense_table.md").read_text()
    lora_row = next(line for line in md.splitlines() if line.startswith("| lora | 3 | 75.0 ["))
    assert lora_row.endswith("(75.0-75.0) | - | - |")  # examples interval, then the range over seeds
    assert "| zero-shot, harness prompt | - | 50.0 [" in md and "| moelora | 3 | 62.5 [" in md
    assert "| lora - zero_shot | ARC-Easy | loglikelihood (training) | +25.0 [" in md
    assert "| moelora - lora | ARC-Easy | loglikelihood (training) | -12.5 [" in md
    recorded = "/venv/bin/python -m moelora_lit fit --config /wt/3/experiments/smollm2_commonsense_lora.yaml"
    assert table.portable(recorded) == "python -m moelora_lit fit --config experiments/smollm2_commonsense_lora.yaml"
    assert table.portable('x \'[{"path": "/work/shared/data/a.json"}]\'') == 'x \'[{"path": "../shared/data/a.json"}]\''


def test_ledger_restores_choices_and_retrains_a_chosen_run_whose_adapter_is_gone(tmp_path: Path) -> None:
    """A fresh machine: the committed records give back the lr choice and the finished evaluations; a chosen seed
    with an evaluation left and no adapter on disk is trained again, one with every evaluation recorded is not."""
    import smollm2_study_ledger as ledger

    first = study.Study(tmp_path / "first")
    for lr, loss in zip(study.INITIAL_LRS, (0.6, 0.5, 0.7), strict=True):
        finish(first, "lora", lr, loss)
    for seed in (1, 2):
        finish(first, "lora", 1e-3, 0.5, seed)
    done_run = first.run_folder("lora", 1e-3, 1)
    for name, *_ in (s for s in study.SCORINGS if not s[3]):
        fake_eval(done_run / "eval" / name, {"arc_e": [1, 0, 1]}, loglik=True)
    preds = next(done_run.rglob("predictions.jsonl"))
    preds.write_text(json.dumps({"dataset": "arc_e", "correct": True, "context": "long prompt"}) + "\n")
    records = tmp_path / "ledger"
    assert ledger.archive(first.out, records) > 0 and ledger.archive(first.out, records) == 0  # up to date
    kept = json.loads(next(records.rglob("predictions.jsonl")).read_text())
    assert kept == {"dataset": "arc_e", "correct": True}
    shutil.rmtree(first.out)  # the adapters go with the machine

    fresh = study.Study(tmp_path / "fresh")
    assert ledger.restore(records, fresh.out) > 0
    assert fresh.choice("lora") == ("lora", 1e-3)
    again = [(t.seed, t.scoring) for t in fresh.train_tasks()[0] if t.method == "lora"]
    assert again == [(0, None), (2, None)]                    # seed 1's evaluations are all recorded
    assert not [t for t in fresh.eval_tasks() if t.method == "lora"]  # nothing to evaluate without adapters


def test_git_keeps_the_ledger_records() -> None:
    """The evaluation records sit in ``lightning_logs/`` folders, which the repository otherwise ignores; a ledger git
    drops would leave a fresh clone's table empty. A clone must hold them, and git must not ignore new ones."""
    import subprocess

    assert len(list(study.LEDGER.rglob("lightning_logs/*/test_results.json"))) >= 20  # the study's 21 evaluations
    record = study.LEDGER / "train/lora/lr0.001/run/seed0/eval/generate/lightning_logs/version_0/predictions.jsonl"
    if (study.ROOT / ".git").exists():  # a checkout (CI clones one); an exported tree has no git to ask
        checked = subprocess.run(["git", "check-ignore", "-q", str(record)], cwd=study.ROOT, check=False)
        assert checked.returncode == 1  # 0 would mean ignored
