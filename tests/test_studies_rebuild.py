"""The committed study results are reproducible from the committed records alone, compact, and portable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "experiments" / "studies"
sys.path.insert(0, str(STUDIES / "smollm2_commonsense"))
import driver as smollm2  # noqa: E402


def test_smollm2_tables_rebuild_byte_for_byte(tmp_path: Path) -> None:
    study = smollm2.build(tmp_path / "runs")
    smollm2.write_tables(study, out=tmp_path)
    for name in ("results.csv", "summary.json", "table.md"):
        assert (tmp_path / name).read_bytes() == (smollm2.RESULTS / name).read_bytes(), name


def test_smollm2_routing_tables_rebuild_byte_for_byte(tmp_path: Path) -> None:
    smollm2.write_routing(out=tmp_path, figure=False)
    for name in ("routing_layers.csv", "routing_summary.csv"):
        assert (tmp_path / name).read_bytes() == (smollm2.RESULTS / "routing" / name).read_bytes(), name


def tracked() -> list[str]:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    return subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()


def test_results_are_compact_and_hold_no_run_folders() -> None:
    files = tracked()
    assert not [f for f in files if "lightning_logs/" in f]
    results = [REPO / f for f in files if "/results/" in f and f.startswith("experiments/") and (REPO / f).is_file()]
    assert results and sum(p.stat().st_size for p in results) < 2 * 2**20


def test_no_committed_file_names_a_path_of_one_machine() -> None:
    needles = ("/work/", "/root/")
    for name in tracked():
        path = REPO / name
        if name.startswith("tests/") or not path.is_file() or path.suffix in (".png", ".gz", ".safetensors"):
            continue
        text = path.read_text(errors="ignore")
        assert not any(n in text for n in needles), name
