"""moelora_lit.analysis: pure functions on small synthetic tables and arrays (no training)."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from moelora_lit import analysis
from moelora_lit.analysis import routing, stats

QUICKSTART = "experiments/quickstart.yaml"


def _results(values: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """``{method: {task: [acc of seed 0, seed 1, ...]}}`` -> test rows in the CSV layout."""
    rows = [{"method": m, "seed": s, "lr": 1e-3, "alpha": 32.0, "split": "test", "task": t, "accuracy": a, "n": 10,
             "effective_n": 10, "steps": 5, "wall_s": 1.0, "trainable_params": 100}
            for m, tasks in values.items() for t, accs in tasks.items() for s, a in enumerate(accs)]
    return pd.DataFrame(rows, columns=analysis.COLUMNS)


def test_methods_share_rank_and_steps_and_lora_scaled_uses_alpha_times_n():
    for method, overrides in analysis.METHODS.items():
        assert not any(o.startswith(("--model.adapter.r=", "--trainer.max_steps", "--model.optimizer"))
                       for o in overrides), method
    assert set(analysis.METHODS) == {"lora", "lora_scaled", "moelora", "moelora_no_contrastive",
                                     "moelora_random_router"}
    assert analysis.METHODS["moelora"] == []
    scaled = analysis.method_overrides("lora_scaled", QUICKSTART)
    assert "--model.adapter.lora_alpha=256" in scaled and "--model.adapter.num_experts=1" in scaled  # 32 x 8
    assert analysis.method_alpha("lora_scaled", QUICKSTART) == 256 and analysis.method_alpha("lora", QUICKSTART) == 32


def test_command_order_run_identity_wins(tmp_path):
    run = analysis.Run("lora", 3e-3, 3)
    cmd = analysis.command("base.yaml", tmp_path, run, ["--model.adapter.num_experts=1"],
                           ["--model.adapter.num_experts=8", "--model.optimizer.init_args.lr=9"])
    assert cmd[:6] == [sys.executable, "-m", "moelora_lit", "fit", "--config", "base.yaml"]
    assert cmd.index("--model.adapter.num_experts=1") > cmd.index("--model.adapter.num_experts=8")
    assert cmd.index("--model.optimizer.init_args.lr=0.003") > cmd.index("--model.optimizer.init_args.lr=9")
    assert f"--trainer.default_root_dir={tmp_path}" in cmd and "--seed_everything=3" in cmd
    assert analysis.run_dir(tmp_path, run) == tmp_path / "lora" / "lr0.003" / "seed3"
    datasets = analysis.eval_datasets(["synth_add"], 7)
    assert "{name: synth_add, limit: 7}" in datasets and "split: validation" in datasets and "val_synth_add" in datasets


def test_t_distribution_matches_tables():
    assert stats.t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert stats.t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert stats.t_quantile(0.975, 10_000) == pytest.approx(1.960, abs=1e-3)
    assert stats.t_sf2(2.228, 10) == pytest.approx(0.05, abs=1e-4)
    assert stats.t_sf2(0.0, 5) == pytest.approx(1.0)


def test_paired_t_and_interval():
    r = stats.paired_t([1, 2, 3, 4, 5], [0, 2, 2, 3, 5])           # d = 1 0 1 1 0: mean 0.6, sd 0.548
    assert r["diff"] == pytest.approx(0.6) and r["n"] == 5
    assert r["t"] == pytest.approx(0.6 / (np.std([1, 0, 1, 1, 0], ddof=1) / np.sqrt(5)))
    assert r["p"] == pytest.approx(0.0705, abs=1e-3)
    assert r["low"] == pytest.approx(0.6 - 2.776 * 0.5477 / np.sqrt(5), abs=1e-3)
    assert stats.paired_t([1, 2], [1, 2])["p"] == 1.0               # identical: no difference, no error
    mean, lo, hi, n = stats.t_interval([0.5])
    assert mean == 0.5 and np.isnan(lo) and n == 1


def test_interval_and_paired_tables():
    df = _results({"lora": {"a": [0.1, 0.3, 0.2], "b": [0.5, 0.7, 0.6]},
                   "moelora": {"a": [0.2, 0.4, 0.3], "b": [0.6, 0.6, 0.6]}})
    acc = stats.interval_table(df).set_index(["method", "task"])
    assert acc.loc[("moelora", "a"), "mean"] == pytest.approx(0.3)
    assert acc.loc[("moelora", stats.MEAN), "mean"] == pytest.approx(0.45)        # per seed first, then seeds
    assert acc.loc[("lora", "a"), "low"] < 0.2 < acc.loc[("lora", "a"), "high"]
    assert acc.loc[("lora", stats.MEAN), "n"] == 20 and acc.loc[("lora", "a"), "seeds"] == 3
    paired = stats.paired_table(df).set_index(["method", "task"])
    assert list(paired.index.get_level_values("method").unique()) == ["lora"]
    assert paired.loc[("lora", "a"), "diff"] == pytest.approx(-0.1)
    assert paired.loc[("lora", "a"), "p"] < 1e-6                             # a constant difference
    text = stats.verdicts(df)
    assert "lora minus moelora" in text and "3 seeds" in text
    assert stats.wide(stats.interval_table(df)).loc["moelora", "a"] == "30.0 [5.2, 54.8]"


def test_choose_takes_the_best_validation_lr_and_breaks_ties_low():
    rows = [{"method": m, "lr": lr, "split": "validation", "task": t, "accuracy": acc}
            for m, lr, acc in [("lora", 1e-3, 0.2), ("lora", 3e-3, 0.5), ("moelora", 1e-3, 0.4), ("moelora", 3e-3, 0.4)]
            for t in ("a", "b")]
    rows.append({"method": "lora", "lr": 1e-3, "split": "test", "task": "a", "accuracy": 1.0})  # never looked at
    chosen = analysis.choose(pd.DataFrame(rows))
    assert chosen["lora"]["lr"] == 3e-3 and chosen["moelora"]["lr"] == 1e-3
    assert chosen["lora"]["val_accuracy"] == 0.5


def test_js_and_specialisation():
    p = np.array([0.5, 0.5, 0.0, 0.0])
    assert routing.js_divergence(p, p) == pytest.approx(0.0)
    assert routing.js_divergence(p, p[::-1]) == pytest.approx(1.0)
    means = np.stack([np.tile(p, (3, 1)), np.tile(p[::-1], (3, 1))])           # (tasks, layers, N)
    np.testing.assert_allclose(routing.specialisation(means), [1.0, 1.0, 1.0])


def test_permutation_test_separates_specialised_from_random_routing():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 30)
    noise = rng.dirichlet(np.ones(4), size=(90, 2))                          # (E, L, N)
    specialised = noise.copy()
    specialised[:, 0] = 0.5 * noise[:, 0] + 0.5 * np.eye(4)[labels]          # layer 0 depends on the task
    test = routing.permutation_test(specialised, labels, permutations=500)
    assert test["p"][0] < 0.01 and test["p"][1] > 0.01
    assert test["specialisation"][0] > test["null_mean"][0]
    assert routing.permutation_test(noise, labels, permutations=500)["mean_p"] > 0.01
    summary = routing.summarise(specialised, labels, ["x", "y", "z"], np.array([0.3, 0.4]), permutations=50)
    assert np.asarray(summary["use"]["x"]).shape == (2, 4) and summary["examples"] == 90


def _summaries() -> dict:
    out = {}
    for method, shift in (("moelora", -0.1), ("moelora_no_contrastive", 0.0)):
        for seed in range(3):
            state = {"entropy": [0.6 + shift + 0.01 * seed, 0.5], "specialisation": [0.02, 0.01], "p": [0.01, 0.5],
                     "null_mean": [0.001, 0.001], "mean_specialisation": 0.015, "mean_null": 0.001, "mean_p": 0.01,
                     "use": {"a": [[0.5, 0.5], [1, 0]]}, "examples": 4}
            out[(method, seed)] = {"layers": ["model.layers.0.q_proj", "model.layers.1.v_proj"],
                                   "step0": state | {"entropy": [0.69, 0.69]}, "trained": state}
    return out


def test_layer_difference_and_tables(tmp_path):
    import json

    summaries = _summaries()
    diff = routing.paired_layer_difference(summaries, "moelora", "moelora_no_contrastive")
    assert diff["diff"].tolist() == pytest.approx([-0.1, 0.0]) and (diff["n"] == 3).all()
    step0 = routing.paired_layer_difference(summaries, "moelora", "moelora_no_contrastive", state="step0")
    assert step0["diff"].tolist() == pytest.approx([0.0, 0.0])
    table = routing.specialisation_table(summaries)
    assert len(table) == 12 and set(table["layers_p05"]) == {1}
    for (m, s), v in summaries.items():
        (tmp_path / f"{m}_seed{s}.json").write_text(json.dumps(v))
    assert routing.load_summaries(tmp_path).keys() == summaries.keys()


def test_plot_tick_labels_are_block_and_projection():
    from moelora_lit.lightning.figures import short_layer_name

    assert short_layer_name("model.layers.3.self_attn.q_proj") == "L3 q_proj"
    assert short_layer_name("transformer.h.10.attn.c_attn") == "L10 c_attn"
    assert short_layer_name("lm_head") == "lm_head"


def test_plots_draw(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from moelora_lit.analysis import plots

    df = _results({"lora": {"synth_add": [0.1, 0.2, 0.3]}, "moelora": {"synth_add": [0.2, 0.3, 0.5]}})
    for fig in (plots.plot_accuracy(df), plots.plot_paired(df), plots.plot_sweep(df.assign(split="validation")),
                plots.plot_layer_difference(_summaries()), plots.plot_specialisation(_summaries()),
                plots.plot_expert_use(_summaries()[("moelora", 0)])):
        fig.savefig(tmp_path / "f.png")
    ax = plots.plot_accuracy(df).axes[0]
    low, high = ax.get_ylim()
    acc = stats.interval_table(df)
    assert low <= 100 * acc["low"].min() and high >= 100 * acc["high"].max()   # intervals are never clipped


def test_methods_are_compared_on_the_seeds_all_of_them_have():
    df = _results({"lora": {"a": [0.1, 0.2, 0.9]}, "moelora": {"a": [0.2, 0.3]}})   # lora has an extra seed 2
    assert stats.shared_seeds(df) == [0, 1]
    acc = stats.interval_table(df).set_index(["method", "task"])
    assert acc.loc[("lora", "a"), "seeds"] == 2 and acc.loc[("lora", "a"), "mean"] == pytest.approx(0.15)
