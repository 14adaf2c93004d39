"""The SmolLM2 methods study: its arm table, every arm's build (meta device) against LoRA's trainable count, and its
tables rebuilt byte for byte from the committed records (which may still be partial)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "experiments" / "studies" / "smollm2_methods"
_spec = importlib.util.spec_from_file_location("smollm2_methods_driver", STUDY / "driver.py")
methods = importlib.util.module_from_spec(_spec)  # a name of its own: other studies' tests import their `driver`
sys.modules[_spec.name] = methods
_spec.loader.exec_module(methods)


def test_arm_table_parses_into_arms_of_existing_configs() -> None:
    table = methods.read_arms()
    assert list(table) == methods.METHODS[1:]
    arms = methods.arms(table)
    for name, arm in arms.items():
        assert arm.configs and all((REPO / c).is_file() for c in arm.configs), name
        assert isinstance(table[name]["rank"], int)
        if arm.follow:
            assert arm.follow in arms
    assert arms["loramoe"].grid == {"model.adapter.balance_weight": ("0.0", "0.1")}
    assert arms["mixlora"].grid == {"model.adapter.balance_weight": ("0.01", "0.001")}
    import yaml

    groups = {d["name"]: d["task_group"] for d in yaml.safe_load((STUDY / "loramoe.yaml").read_text())["data.train"]}
    assert groups == {"arc_e": 1, "obqa": 1, "boolq": 0}  # knowledge QA vs reading comprehension
    for name in ("loramoe", "hydralora", "mola", "flylora", "mixlora"):  # method preset, then the rank match
        assert arms[name].configs[1:] == (f"experiments/methods/{name}.yaml",
                                          f"experiments/studies/smollm2_methods/{name}.yaml")


def test_every_arm_builds_within_20_percent_of_lora_r32(monkeypatch: pytest.MonkeyPatch) -> None:
    from moelora_lit.lightning.describe_run import describe_config

    monkeypatch.chdir(REPO)  # data paths in the configs are relative to the repository root
    table = methods.read_arms()
    counts, built = {}, {}
    for name, spec in table.items():
        d = describe_config([x for c in spec["configs"] for x in ("--config", c)])
        counts[name], built[name] = d["trainable_params"], d
        modules = d["modules"]
        assert len(modules) == 210, name  # all seven projections of the 30 blocks
        assert {m["name"].rsplit(".", 1)[-1] for m in modules} == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, name
    assert counts["lora"] == 9_768_960  # r 32 on the seven projections, no router at one expert
    for name, count in counts.items():
        assert 0.8 <= count / counts["lora"] <= 1.2, (name, count)
    assert {m["rank"] for m in built["flylora"]["modules"]} == {64}
    assert {m["experts"] for m in built["mola"]["modules"]} == {2, 4, 6, 8}
    committed = pd.read_csv(methods.RESULTS / "params.csv")
    assert dict(zip(committed["arm"], committed["trainable_params"], strict=True)) == counts
    assert dict(zip(committed["arm"], committed["rank"], strict=True)) == {k: v["rank"] for k, v in table.items()}


def test_tables_rebuild_byte_for_byte(tmp_path: Path) -> None:
    study = methods.build(tmp_path / "runs")
    methods.write_tables(study, out=tmp_path)
    for name in ("methods_commonsense.csv", "methods_grid.csv", "summary.json", "table.md"):
        assert (tmp_path / name).read_bytes() == (methods.RESULTS / name).read_bytes(), name
    rows = pd.read_csv(tmp_path / "methods_commonsense.csv")
    assert list(rows.columns) == methods.CSV_COLUMNS
    assert set(rows["method"]) <= set(methods.METHODS)
    assert not rows.duplicated(["method", "seed", "dataset", "scoring"]).any()


def test_routing_tables_rebuild_byte_for_byte(tmp_path: Path) -> None:
    methods.write_routing(out=tmp_path, figure=False)
    for name in ("routing_arms.csv", "routing_depth.csv"):
        assert (tmp_path / name).read_bytes() == (methods.RESULTS / "routing" / name).read_bytes(), name


def test_reused_arms_need_no_run_and_new_arms_start_with_their_grids(tmp_path: Path) -> None:
    study = methods.build(tmp_path / "runs")
    for arm in ("lora", "moelora", "moelora_no_contrastive"):
        assert study.choice(arm) is not None, arm
    jobs = methods.ordered_jobs(study, "all")
    assert not [j for j in jobs if j.meta.get("arm") in ("lora", "moelora", "moelora_no_contrastive")
                or j.meta.get("method") in ("zero_shot", "lora", "moelora", "moelora_no_contrastive")]
    train = [j for j in jobs if j.label.startswith("train")]
    for job in train:
        choice = study.choice(job.meta["arm"])
        if choice is None:                  # an open grid runs its first seed
            assert job.meta["seed"] == methods.SEEDS[0], job.label
        else:                               # a chosen arm (committed records) trains only at its choice: the other
            # seeds, and seed 0 again where an evaluation still needs the run folder that this checkout lacks
            assert (job.meta["variant"], job.meta["lr"]) == (choice[0], choice[2]), job.label
    assert any(study.choice(j.meta["arm"]) is None for j in train)      # some grid is still open
    order = list(dict.fromkeys(j.meta["arm"] for j in train))
    assert order == [a for a in methods.read_arms() if a in order]       # one arm after another, arms.yaml's order
