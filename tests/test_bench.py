"""benchmarks/bench.py runs end to end at --preset tiny and writes a complete JSON report (no timing asserts)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("base", "peft_lora", "moelora", "moelora_no_cl", "moelora_dense")


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--preset", "tiny", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "step_time_ratio_vs_peft_lora" in proc.stdout  # the table and the summary were printed
    return json.loads(out.read_text())


def test_headline_ratios_are_positive_and_finite(report):
    for key in ("step_time_ratio_vs_peft_lora", "peak_memory_ratio_vs_peft_lora",
                "generate_time_ratio_vs_peft_lora"):
        assert positive_finite(report[key]), (key, report[key])
    # with / without contrastive - 1: finite, may be slightly negative from timing noise
    assert math.isfinite(report["contrastive_overhead"]) and report["contrastive_overhead"] > -1
    assert set(report["targets_met"]) == set(report["targets"])


def test_every_variant_has_timings_and_memory(report):
    assert set(report["variants"]) == set(VARIANTS)
    reps = report["sizes"]["reps"]
    for name, row in report["variants"].items():
        for key in ("step_ms_median", "step_cpu_ms_median", "step_time_ratio_vs_peft_lora", "peak_memory_mb",
                    "persistent_mb", "step_transient_peak_mb", "peak_memory_ratio_vs_peft_lora"):
            assert positive_finite(row[key]), (name, key, row[key])
        assert len(row["step_ms_all"]) == reps and all(positive_finite(t) for t in row["step_ms_all"])
        assert row["peak_memory_mb"] >= row["persistent_mb"]
        assert positive_finite(row["first_step_ms"])                    # includes one-time compiling
    assert report["variants"]["peft_lora"]["step_time_ratio_vs_peft_lora"] == 1.0
    assert report["variants"]["base"]["trainable_params"] == 0
    # MoELoRA has exactly LoRA's parameters plus the router (docs/design.md §1.1)
    s = report["sizes"]
    router = s["experts"] * s["hidden"] * s["layers"] * len(s["targets"])
    lora = report["variants"]["peft_lora"]["trainable_params"]
    assert report["variants"]["moelora"]["trainable_params"] == lora + router


def test_flop_ratios_and_efficiency(report):
    s = report["sizes"]
    for name, row in report["variants"].items():
        for key in ("base_flops_per_token", "step_flops", "flop_ratio_vs_peft_lora", "efficiency_vs_peft_lora"):
            assert positive_finite(row[key]), (name, key, row[key])
        per_token = row["base_flops_per_token"] + row["adapter_flops_per_token"]
        assert row["step_flops"] == pytest.approx(s["batch"] * s["seq"] * per_token)
        assert row["efficiency_vs_peft_lora"] == pytest.approx(
            row["flop_ratio_vs_peft_lora"] / row["step_time_ratio_vs_peft_lora"])
    rows = report["variants"]
    assert rows["base"]["adapter_flops_per_token"] == 0 and rows["base"]["flop_ratio_vs_peft_lora"] < 1
    assert rows["peft_lora"]["flop_ratio_vs_peft_lora"] == 1.0
    # top-2 of 4 experts runs half of LoRA's ranks (the layer computes all of them: the executed count)
    moe = rows["moelora"]["adapter_flops_breakdown"]["experts"]
    assert moe == pytest.approx(rows["peft_lora"]["adapter_flops_breakdown"]["experts"] * s["top_k"] / s["experts"])
    assert rows["moelora"]["adapter_flops_per_token_executed"] > rows["moelora"]["adapter_flops_per_token"]
    assert rows["moelora_no_cl"]["adapter_flops_breakdown"]["contrastive"] == 0
    assert rows["moelora"]["adapter_flops_breakdown"]["contrastive"] > 0
    assert report["flop_ratio_vs_peft_lora"] == rows["moelora"]["flop_ratio_vs_peft_lora"]


def test_generation_timed_for_lora_and_moelora(report):
    s = report["sizes"]
    for name in ("peft_lora", "moelora"):
        row = report["variants"][name]
        assert positive_finite(row["generate_ms_median"]) and len(row["generate_ms_all"]) == s["gen_reps"]
        assert row["generate_new_tokens"] == s["gen_new_tokens"]
        assert positive_finite(row["generate_time_ratio_vs_peft_lora"])


def test_environment_is_recorded(report):
    assert report["device"] == "cpu" and report["threads"] >= 1 and report["torch_version"]
    for key in ("layers", "hidden", "intermediate", "heads", "vocab", "seq", "batch", "rank", "experts", "top_k"):
        assert positive_finite(report["sizes"][key]), key


def test_matmul_gflops_recorded(report):
    assert positive_finite(report["matmul_gflops"])


def test_paired_ratios_cpu_time_and_load_are_recorded(report):
    """Load-robust figures: each round's own ratio (wall and CPU time) and the load before every round."""
    reps = report["sizes"]["reps"]
    assert len(report["load_average_per_round"]) == reps
    for name, row in report["variants"].items():
        assert len(row["paired_step_time_ratios_all"]) == reps
        assert positive_finite(row["paired_step_cpu_ratio_vs_peft_lora"]), name
        assert row["paired_efficiency_vs_peft_lora"] == pytest.approx(
            row["flop_ratio_vs_peft_lora"] / row["paired_step_time_ratio_vs_peft_lora"])
    assert report["variants"]["peft_lora"]["paired_step_time_ratio_vs_peft_lora"] == 1.0
    assert positive_finite(report["paired_generate_time_ratio_vs_peft_lora"])
    assert report["efficiency_target"] == 0.90 and set(report["efficiency_targets_met"]) == {"moelora"}


def test_quickstart_preset_is_the_quickstart_shape():
    """presets.py's quickstart = experiments/quickstart.yaml on the embedded tiny base."""
    import yaml

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from presets import PRESETS, Sizes, targets_for

    s = Sizes(**PRESETS["quickstart"])
    base = json.loads((ROOT / "moelora_lit" / "assets" / "tiny-base" / "config.json").read_text())
    assert (s.layers, s.hidden, s.intermediate, s.heads, s.kv_heads, s.vocab, s.tie_embeddings) == (
        base["num_hidden_layers"], base["hidden_size"], base["intermediate_size"], base["num_attention_heads"],
        base["num_key_value_heads"], base["vocab_size"], base["tie_word_embeddings"])
    cfg = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    adapter, data = cfg["model"]["adapter"], cfg["data"]
    assert (s.rank, s.experts, s.top_k, s.alpha, s.dropout, s.queue, s.contrastive_weight, s.balance_weight) == (
        adapter["r"], adapter["num_experts"], adapter["top_k"], adapter["lora_alpha"], adapter["lora_dropout"],
        adapter["contrastive_queue_size"], adapter["contrastive_weight"], adapter["balance_weight"])
    assert s.targets == adapter["target_modules"]
    assert (s.batch, s.seq) == (data["batch_size"], data["max_length"])
    assert targets_for("quickstart") == {"step_time_ratio_vs_peft_lora": 1.25,
                                         "paired_step_time_ratio_vs_peft_lora": 1.25}
    assert targets_for("default")["step_time_ratio_vs_peft_lora"] == 1.10
    assert targets_for("default")["peak_memory_ratio_vs_peft_lora"] == 1.05


def test_smollm2_preset_is_smollm2_135m():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from presets import ALL_PROJECTIONS, PRESETS, Sizes

    s = Sizes(**PRESETS["smollm2"])
    assert (s.layers, s.hidden, s.intermediate, s.heads, s.kv_heads, s.vocab, s.tie_embeddings) == (
        30, 576, 1536, 9, 3, 49152, True)
    assert (s.rope_theta, s.rms_eps, s.batch, s.seq, s.targets) == (100000.0, 1e-5, 8, 128, ALL_PROJECTIONS)
    assert (s.rank, s.experts, s.top_k, s.contrastive_weight, s.balance_weight, s.aux_reduction) == (
        32, 8, 2, 0.01, 0.01, "mean")


def test_family_variant_is_built_from_its_method_preset(tmp_path, monkeypatch):
    """A family variant reads experiments/methods/<name>.yaml's model.adapter; the benchmark's targets fill in only
    where the preset names none; a missing preset is an error that names the file."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import measure
    import presets

    monkeypatch.setattr(presets, "METHODS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="mola.yaml"):
        presets.method_adapter("mola", ["q_proj"])
    (tmp_path / "mola.yaml").write_text("model:\n  adapter: {r: 8, num_experts: 2, top_k: 1}\n")
    assert presets.method_adapter("mola", ["q_proj"])["target_modules"] == ["q_proj"]
    (tmp_path / "loramoe.yaml").write_text("model:\n  adapter: {r: 4, num_experts: 4, target_modules: [up_proj]}\n")
    assert presets.method_adapter("loramoe", ["q_proj"])["target_modules"] == ["up_proj"]
    s = presets.Sizes(**presets.PRESETS["tiny"])
    model = measure.make_variant("mola", measure.build_base(s, torch.device("cpu")), s)
    layers = [m for m in model.modules() if getattr(m, "base_layer", None) is not None]
    assert len(layers) == s.layers * len(s.targets)
    assert all(m.config.r == 8 and m.config.num_experts == 2 for m in layers)


def test_missing_method_preset(tmp_path, monkeypatch):
    """A family variant without its preset file: an error naming the file, or with --skip-unavailable a report
    that names it as not measured."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench
    import presets

    monkeypatch.setattr(presets, "METHODS_DIR", tmp_path)
    args = ["--preset", "tiny", "--variants", "peft_lora,flylora", "--no-generate", "--reps", "1", "--warmup", "1"]
    with pytest.raises(SystemExit, match="flylora.yaml"):
        bench.main(args)
    report = bench.main([*args, "--skip-unavailable"])
    assert set(report["variants"]) == {"peft_lora"} and "flylora.yaml" in report["unavailable_variants"]["flylora"]


def test_scaling_runs_at_tiny(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--preset", "tiny", "--limit", "2", "--warmup", "1",
         "--reps", "1", "--sweeps", "experts,queue", "--out", str(tmp_path), "--plot", str(tmp_path / "s.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "scaling.json").read_text())
    assert positive_finite(result["matmul_gflops"]) and (tmp_path / "s.png").stat().st_size > 0
    rows = result["rows"]
    assert {(r["sweep"], r["value"]) for r in rows} == {("experts", 1), ("experts", 2), ("queue", 32), ("queue", 64)}
    assert all(positive_finite(r["step_ms_median"]) and positive_finite(r["peak_memory_mb"]) for r in rows)
    assert (tmp_path / "scaling.csv").read_text().startswith("sweep,value,")


def test_matmul_gflops_is_positive_and_restores_the_thread_count():
    import torch

    from moelora_lit.machine import matmul_gflops

    before = torch.get_num_threads()
    speed = matmul_gflops(n=128, reps=2, threads=1, inner=2)
    assert speed > 0 and speed == speed                                  # finite, not NaN
    assert torch.get_num_threads() == before
