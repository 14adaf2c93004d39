"""benchmarks/bench.py runs end to end at --preset tiny and writes a complete JSON report (no timing asserts)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_generation_timed_for_lora_and_moelora(report):
    s = report["sizes"]
    for name in ("peft_lora", "moelora"):
        row = report["variants"][name]
        assert positive_finite(row["generate_ms_median"]) and len(row["generate_ms_all"]) == s["gen_reps"]
        assert row["generate_new_tokens"] == s["gen_new_tokens"]


def test_environment_is_recorded(report):
    assert report["device"] == "cpu" and report["threads"] >= 1 and report["torch_version"]
    for key in ("layers", "hidden", "intermediate", "heads", "vocab", "seq", "batch", "rank", "experts", "top_k"):
        assert positive_finite(report["sizes"][key]), key


def test_matmul_gflops_recorded(report):
    assert positive_finite(report["matmul_gflops"])


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
    assert targets_for("quickstart") == {"step_time_ratio_vs_peft_lora": 1.35}
    assert targets_for("default")["step_time_ratio_vs_peft_lora"] == 1.15


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
