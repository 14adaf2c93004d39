"""``python -m moelora_lit data prepare --source SRC --out DIR``: LLM-Adapters' data, verified, in the configs' layout.

SRC is a local LLM-Adapters checkout (or any folder with its layout: ``ft-training_set/math_10k.json``,
``dataset/<Name>/test.json``) or a git URL, cloned at the pinned commit. Every file is checked against the manifest
committed in this package (``llm_adapters_manifest.tsv``: git blob ids at LLM-Adapters commit 8166572, what
``git hash-object`` prints) before anything is written; a missing or changed file stops with its path, the
expected and the found id. Output (``--out data`` is what ``experiments/llama7b_*.yaml`` read)::

    DIR/math_10k.json, DIR/commonsense_170k.json              the training sets as published
    DIR/math_10k_{train,val}.json, commonsense_170k_{...}     LLM-Adapters' split: 120 validation rows
    DIR/llm-adapters/<Name>/test.json                         the 15 test sets (7 math incl. MAWPS, 8 common sense)
    DIR/PREPARED.json                                         source, commit, blob ids, split settings

The split is ``datasets.Dataset.train_test_split(test_size=120, shuffle=True, seed=42)`` as in LLM-Adapters'
``finetune.py`` (``--val_set_size 120``), re-implemented with numpy: ``default_rng(42).permutation(n)``, the first
120 indices are the validation rows, the rest the training rows, in that order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MANIFEST = Path(__file__).with_name("llm_adapters_manifest.tsv")
COMMIT = "816657208af4db747803f87ba40a4c71383fed7a"
URL = "https://github.com/AGI-Edgerunners/LLM-Adapters"
TRAIN = {"math": "ft-training_set/math_10k.json", "commonsense": "ft-training_set/commonsense_170k.json"}
TESTS = {
    "math": ["gsm8k", "SVAMP", "AQuA", "AddSub", "MultiArith", "SingleEq", "mawps"],
    "commonsense": ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
                    "openbookqa"],
}


class PrepareError(Exception):
    """A missing file, a checksum mismatch or a failed clone (the message says which)."""


def git_blob_id(path: Path) -> str:
    """SHA-1 of ``b"blob <size>\\0" + content``: the id ``git hash-object`` prints."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: Path = MANIFEST) -> dict[str, str]:
    """``{relative path: git blob id}`` from a manifest TSV (``#`` comments, a ``path`` header line)."""
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip() or line.startswith("path\t"):
            continue
        name, blob = line.split("\t")
        rows[name] = blob.strip()
    return rows


def wanted_files(tasks: list[str]) -> list[str]:
    """Source paths (relative to an LLM-Adapters checkout) that ``tasks`` need."""
    return [TRAIN[t] for t in tasks] + [f"dataset/{name}/test.json" for t in tasks for name in TESTS[t]]


def verify(source: Path, files: list[str], manifest: dict[str, str]) -> dict[str, str]:
    """Check every file against the manifest; raises PrepareError listing every problem."""
    problems, found = [], {}
    for name in files:
        path = source / name
        if name not in manifest:
            problems.append(f"{name}: not in the manifest")
        elif not path.is_file():
            problems.append(f"{path}: missing (expected git blob {manifest[name]})")
        else:
            found[name] = git_blob_id(path)
            if found[name] != manifest[name]:
                problems.append(f"{path}: checksum mismatch: expected git blob {manifest[name]}, found {found[name]}")
    if problems:
        raise PrepareError(f"{len(problems)} of {len(files)} files failed verification:\n  " + "\n  ".join(problems))
    return found


def split_rows(rows: list, val_size: int, seed: int) -> tuple[list, list]:
    """(train, val) as ``datasets``' ``train_test_split(test_size=val_size, shuffle=True, seed=seed)``."""
    if not 0 < val_size < len(rows):
        raise PrepareError(f"--val-size {val_size}: must be between 1 and {len(rows) - 1} rows")
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order[val_size:]], [rows[i] for i in order[:val_size]]


def clone(url: str, commit: str, into: Path) -> Path:
    """``git clone`` + checkout of ``commit`` (needs network and git)."""
    try:
        subprocess.run(["git", "clone", "--quiet", "--filter=blob:none", "--no-checkout", url, str(into)],
                       check=True, capture_output=True, text=True)
        subprocess.run(["git", "-C", str(into), "checkout", "--quiet", commit], check=True, capture_output=True,
                       text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        raise PrepareError(f"could not clone {url} at {commit}: {detail.strip()}") from None
    return into


def prepare(source: str | Path, out: str | Path, tasks: list[str] | None = None, commit: str = COMMIT,
            val_size: int = 120, seed: int = 42, manifest: Path = MANIFEST) -> dict:
    """Verify and write the data of ``tasks`` (default math and commonsense); returns the PREPARED.json record."""
    tasks = tasks or list(TRAIN)
    text = str(source)
    with tempfile.TemporaryDirectory() as tmp:
        remote = text.startswith(("http://", "https://", "git@", "file://")) or text.endswith(".git")
        root = clone(text, commit, Path(tmp) / "src") if remote else Path(source)
        if not root.is_dir():
            raise PrepareError(f"--source {text}: no such folder (give an LLM-Adapters checkout or a git URL)")
        files = wanted_files(tasks)
        blobs = verify(root, files, read_manifest(manifest))
        out = Path(out)
        record = {"source": text, "commit": commit if remote else None, "manifest_commit": COMMIT,
                  "files": {}, "split": {"val_size": val_size, "seed": seed, "rule": "numpy default_rng permutation"}}
        for name in files:
            if name.startswith("dataset/"):
                target = out / "llm-adapters" / name.removeprefix("dataset/")
            else:
                target = out / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, target)
            record["files"][str(target.relative_to(out))] = blobs[name]
        for task in tasks:
            stem = Path(TRAIN[task]).stem
            rows = json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))
            train, val = split_rows(rows, val_size, seed)
            for part, part_rows in (("train", train), ("val", val)):
                (out / f"{stem}_{part}.json").write_text(json.dumps(part_rows, indent=1), encoding="utf-8")
                record["split"][f"{stem}_{part}"] = len(part_rows)
    (out / "PREPARED.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``python -m moelora_lit data prepare``); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m moelora_lit data prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help=f"LLM-Adapters checkout/folder, or a git URL (e.g. {URL})")
    parser.add_argument("--out", required=True, help="output folder (the configs read data/)")
    parser.add_argument("--tasks", nargs="+", choices=list(TRAIN), default=list(TRAIN))
    parser.add_argument("--commit", default=COMMIT, help="commit to check out when --source is a git URL")
    parser.add_argument("--val-size", type=int, default=120, help="validation rows held out (LLM-Adapters: 120)")
    parser.add_argument("--seed", type=int, default=42, help="split seed (LLM-Adapters: 42)")
    parser.add_argument("--manifest", type=Path, default=MANIFEST, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        record = prepare(args.source, args.out, args.tasks, args.commit, args.val_size, args.seed, args.manifest)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"verified and wrote {len(record['files'])} files to {args.out}; split {record['split']}")
    return 0
