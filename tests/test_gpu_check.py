"""scripts/gpu_check.py runs end to end on CPU (``--cpu``): every check either passes scaled down or says it needs
CUDA, the table is printed and the JSON written. The CUDA numbers themselves come from a GPU machine only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CUDA_ONLY = {"bench_7b_layer", "nf4", "fsdp_1gpu"}


def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MOELORA_COMPILE_CONTRASTIVE": "0"}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu", "--json", str(out),
                           "--out", str(tmp_path / "runs")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    assert set(checks) == CUDA_ONLY | {"bf16_train", "bench_default", "bench_smollm2", "grad_ckpt"}
    for name, result in checks.items():
        assert result["status"] == ("skipped: needs CUDA" if name in CUDA_ONLY else "ok"), (name, result)
        assert f"{name} " in done.stdout                                   # a row of the printed table
    assert len(checks["bf16_train"]["losses"]) == 2
    assert all(v is not None for v in checks["bench_default"]["ratios"].values())
    family = checks["bench_smollm2"]      # every method with a preset measured; one without is named as not measured
    methods = {"lora", "moelora", "loramoe", "hydralora", "mola", "flylora", "mixlora"}
    assert set(family["variants"]) | set(family["not_measured"]) == methods
    assert {m for m in methods - {"lora", "moelora"} if (REPO / "experiments" / "methods" / f"{m}.yaml").exists()} \
        <= set(family["variants"]), family["not_measured"]
    assert all(v is not None for row in family["variants"].values() for v in row.values())
    assert "GFLOPS" in done.stdout
