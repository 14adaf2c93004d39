"""``data prepare`` on a local LLM-Adapters-layout folder of small fixtures: files verified and written in the
configs' layout, LLM-Adapters' validation split, and a corrupted or missing file fails naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from moelora_lit.__main__ import main as cli_main
from moelora_lit.data.prepare import (
    MANIFEST,
    TESTS,
    TRAIN,
    PrepareError,
    git_blob_id,
    prepare,
    read_manifest,
    split_rows,
    wanted_files,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters"


def _rows(n: int, answer: str = "1") -> list[dict]:
    return [{"instruction": f"q{i}", "input": "", "output": f"The answer is {answer}", "answer": answer}
            for i in range(n)]


@pytest.fixture()
def source(tmp_path: Path) -> tuple[Path, Path]:
    """A fake LLM-Adapters checkout (math task only) and a manifest of its own blob ids."""
    root = tmp_path / "LLM-Adapters"
    for name in wanted_files(["math"]):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_rows(10 if name.startswith("ft-") else 3)))
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("# test\npath\tgit_blob_sha1\n" + "".join(
        f"{name}\t{git_blob_id(root / name)}\n" for name in wanted_files(["math"])))
    return root, manifest


def test_blob_id_is_gits(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(b'[{"a": 1}]\n')
    expected = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True)
    assert git_blob_id(path) == expected.stdout.strip()


def test_committed_manifest_lists_every_file_the_configs_read() -> None:
    manifest = read_manifest()
    assert set(wanted_files(list(TRAIN))) <= set(manifest)
    assert len(TESTS["math"]) + len(TESTS["commonsense"]) == 15 and "mawps" in TESTS["math"]
    if (SHARED / "MANIFEST.tsv").is_file():  # the committed copy is the shared one, verbatim
        assert MANIFEST.read_text() == (SHARED / "MANIFEST.tsv").read_text()
    if (SHARED / "gsm8k" / "test.json").is_file():
        assert git_blob_id(SHARED / "gsm8k" / "test.json") == manifest["dataset/gsm8k/test.json"]


def test_prepare_writes_the_configs_layout(source: tuple[Path, Path], tmp_path: Path) -> None:
    root, manifest = source
    out = tmp_path / "data"
    record = prepare(root, out, ["math"], val_size=4, manifest=manifest)
    assert (out / "math_10k.json").read_bytes() == (root / "ft-training_set/math_10k.json").read_bytes()
    for name in TESTS["math"]:
        assert (out / "llm-adapters" / name / "test.json").is_file()
    train = json.loads((out / "math_10k_train.json").read_text())
    val = json.loads((out / "math_10k_val.json").read_text())
    assert (len(train), len(val)) == (6, 4) and {r["instruction"] for r in train + val} == {f"q{i}" for i in range(10)}
    assert record["split"]["math_10k_val"] == 4
    assert json.loads((out / "PREPARED.json").read_text())["files"]["llm-adapters/gsm8k/test.json"]


def test_split_is_datasets_train_test_split() -> None:
    datasets = pytest.importorskip("datasets")
    rows = _rows(50)
    for i, row in enumerate(rows):
        row["instruction"] = f"q{i}"
    ours_train, ours_val = split_rows(rows, 12, 42)
    theirs = datasets.Dataset.from_list(rows).train_test_split(test_size=12, shuffle=True, seed=42)
    assert [r["instruction"] for r in ours_val] == theirs["test"]["instruction"]
    assert [r["instruction"] for r in ours_train] == theirs["train"]["instruction"]


def test_corrupted_file_fails_its_checksum(source: tuple[Path, Path], tmp_path: Path) -> None:
    root, manifest = source
    target = root / "dataset/SVAMP/test.json"
    expected = git_blob_id(target)
    target.write_text(target.read_text().replace("q1", "q9"))
    with pytest.raises(PrepareError, match="checksum mismatch") as err:
        prepare(root, tmp_path / "data", ["math"], val_size=4, manifest=manifest)
    assert str(target) in str(err.value) and expected in str(err.value) and git_blob_id(target) in str(err.value)
    assert not (tmp_path / "data").exists()  # nothing written before every file verified


def test_missing_file_and_cli_exit_code(source: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    root, manifest = source
    shutil.rmtree(root / "dataset/mawps")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["data", "prepare", "--source", str(root), "--out", str(tmp_path / "d"), "--tasks", "math",
                  "--manifest", str(manifest)])
    assert exit_.value.code == 2
    assert "dataset/mawps/test.json: missing" in capsys.readouterr().err


def test_git_source_is_cloned_at_the_commit(source: tuple[Path, Path], tmp_path: Path) -> None:
    root, manifest = source
    git = ["git", "-C", str(root), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "fixture"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    record = prepare(f"file://{root}", tmp_path / "data", ["math"], commit=commit, val_size=4, manifest=manifest)
    assert record["commit"] == commit and (tmp_path / "data" / "math_10k_val.json").is_file()
