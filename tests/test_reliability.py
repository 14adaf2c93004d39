"""Reliability and security through the real CLI (``moelora_lit.__main__.main``) on a tiny local base model.

Bad inputs fail in seconds with one ``error:`` line naming the key, path or row and write no checkpoint; a
non-finite loss stops the run; SIGINT mid-fit saves a checkpoint that resumes exactly; same seed, same
losses; a checkpoint with a pickled payload is refused without running it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hf_folder import build_tiny_hf_folder

from moelora_lit.__main__ import main
from moelora_lit.data.resumable import ResumableDataLoader
from moelora_lit.lightning.checks import describe_error
from moelora_lit.lightning.fault_tolerance import FaultTolerance

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "experiments" / "smoke.yaml")
GOOD_ROW = {"instruction": "What is 2+3?", "input": "", "output": "2+3=5. The answer is 5", "answer": "5"}
# A small, fast fit: 16 synthetic rows in batches of 4 (4 steps per epoch), 6 steps, dropout on (uses the RNG).
FAST = ["--data.train=[{name: synth_all, limit: 16}]", "--data.val=null", "--data.test=null", "--data.batch_size=4",
        "--trainer.max_steps=6", "--trainer.val_check_interval=1.0", "--trainer.log_every_n_steps=1",
        "--test_after_fit=false", "--model.adapter.lora_dropout=0.1", "--model.adapter.contrastive_queue_size=16"]
LOSS_TAGS = ("train/loss", "train/task_loss", "train/contrastive_loss", "train/balance_loss")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A tiny Llama + BPE tokenizer trained on the synthetic suite, saved as a HF folder."""
    return build_tiny_hf_folder(tmp_path_factory.mktemp("tiny-base"))


def fit_args(base: str, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", SMOKE, "--model.base_model", base, "--trainer.default_root_dir", str(root), *extra]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """``main(args)`` in-process: (exit code, captured stderr)."""
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


def written(root: Path) -> list[str]:
    """Checkpoints and model files under ``root``."""
    patterns = ("**/*.ckpt", "**/*.safetensors", "**/adapter_config.json")
    return sorted(p for pattern in patterns for p in glob.glob(str(root / pattern), recursive=True))


def tb_losses(root: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of the train loss terms in every TensorBoard event file under ``root``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {tag: {} for tag in LOSS_TAGS}
    for path in sorted(glob.glob(str(root / "**" / "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in LOSS_TAGS:
            if tag in acc.Tags()["scalars"]:
                out[tag].update({e.step: e.value for e in acc.Scalars(tag)})
    return out


# ----------------------------------------------------------------------------------------- bad inputs
def _data_files(d: Path) -> None:
    no_answer = {"instruction": "What is 1+1?", "input": "", "output": "1+1=2"}
    (d / "noanswer.json").write_text(json.dumps([GOOD_ROW, no_answer]))
    (d / "emptyout.json").write_text(json.dumps([GOOD_ROW, {**GOOD_ROW, "output": "  "}]))
    (d / "badgold.json").write_text(json.dumps([{**GOOD_ROW, "answer": "seven"}]))
    (d / "bad.json").write_text('[{"instruction": "a", "output": "b",}]')
    (d / "bad.jsonl").write_text(json.dumps(GOOD_ROW) + "\n{oops\n")
    (d / "afile").write_text("not a folder")


BAD_INPUTS = {  # id: (extra CLI args, strings the message must contain); {d} is a folder of prepared files
    "r_not_divisible": (["--model.adapter.r=10", "--model.adapter.num_experts=4"],
                        ["MoELoRAConfig.r=10", "divisible by num_experts=4"]),
    "unknown_target": (["--model.adapter.target_modules=[nope_proj]"], ["nope_proj", "matched no module", "q_proj"]),
    "missing_base": (["--model.base_model=/nonexistent"], ["model.base_model", "/nonexistent"]),
    "row_without_answer": (["--data.train=[{name: math_10k, path: {d}/noanswer.json}]"],
                           ["data.train[0]", "noanswer.json", "row 1", "'answer'"]),
    "row_empty_output": (["--data.train=[{name: math_10k, path: {d}/emptyout.json}]"],
                         ["data.train[0]", "emptyout.json", "row 1", "'output'"]),
    "gold_not_a_number": (["--data.test=[{name: gsm8k, path: {d}/badgold.json}]"],
                          ["data.test[0]", "badgold.json", "row 0", "'seven'"]),
    "invalid_json": (["--data.train=[{name: math_10k, path: {d}/bad.json}]"],
                     ["data.train[0].path", "bad.json", "line 1"]),
    "invalid_jsonl": (["--data.train=[{name: math_10k, path: {d}/bad.jsonl}]"], ["bad.jsonl", "line 2"]),
    "missing_file": (["--data.train=[{name: math_10k, path: {d}/nope.json}]"], ["data.train[0].path", "nope.json"]),
    "unknown_dataset": (["--data.train=[{name: nope}]"], ["data.train[0].name", "'nope'", "gsm8k"]),
    "prompt_over_max_length": (["--data.max_length=4"], ["data.max_length=4"]),
    "batch_size_zero": (["--data.batch_size=0"], ["data.batch_size", "0"]),
    "r_not_int": (["--model.adapter.r=abc"], ["model.adapter.r", "abc"]),
    "unknown_adapter_field": (["--model.adapter.nope=1"], ["model.adapter", "'nope'"]),
    "unknown_router": (["--model.adapter.router=foo"], ["router='foo'", "topk"]),
    "top_k_over_experts": (["--model.adapter.top_k=9"], ["top_k=9", "num_experts=4"]),
    "dropout_out_of_range": (["--model.adapter.lora_dropout=1.5"], ["lora_dropout=1.5"]),
    "negative_lr": (["--model.optimizer.init_args.lr=-1"], ["model.optimizer", "learning rate"]),
    "bad_dtype": (["--model.torch_dtype=float8"], ["model.torch_dtype", "float8"]),
    "missing_init_adapter": (["--model.init_adapter={d}/no_adapter"], ["no_adapter", "adapter_config.json"]),
    "missing_config_file": (["--config={d}/none.yaml"], ["config", "none.yaml"]),
    "missing_ckpt": (["--ckpt_path={d}/none.ckpt"], ["ckpt_path", "none.ckpt"]),
    "unwritable_root_dir": (["--trainer.default_root_dir={d}/afile/logs"], ["trainer.default_root_dir", "afile/logs"]),
    "unwritable_logger_dir": (["--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                               "--trainer.logger.save_dir={d}/afile/csv"], ["trainer.logger.save_dir", "afile/csv"]),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    _data_files(d)
    return d


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_fast_with_one_clear_line(case, base, data_dir, tmp_path, capsys):
    extra, expected = BAD_INPUTS[case]
    start = time.perf_counter()
    code, err = run_cli(fit_args(base, tmp_path, *[a.replace("{d}", str(data_dir)) for a in extra]), capsys)
    elapsed = time.perf_counter() - start
    assert code == 2, err
    assert "Traceback" not in err and "usage:" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: "), err
    for text in expected:
        assert text in message, message
    assert elapsed < 20, f"{case} took {elapsed:.1f}s"
    assert written(tmp_path) == []


def test_debug_env_keeps_the_traceback(base, tmp_path, monkeypatch):
    monkeypatch.setenv("MOELORA_DEBUG", "1")
    with pytest.raises(ValueError) as info:
        main(fit_args(base, tmp_path, "--model.adapter.r=10", "--model.adapter.num_experts=4"))
    assert "MoELoRAConfig.r=10" in describe_error(info.value)


def test_print_config_still_works(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", SMOKE, "--print_config"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "weights_only: true" in out and "faults:" in out and "routing:" in out


# ----------------------------------------------------------------------------------------- runs
class WaitForSignal(L.Callback):
    """Test helper: before global step ``step`` write ``marker`` and wait for the signal to arrive."""

    def __init__(self, step: int, marker: str, timeout: float = 60.0) -> None:
        self.step, self.marker, self.timeout = step, marker, timeout

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        fault = next(c for c in trainer.callbacks if isinstance(c, FaultTolerance))
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while fault.signum is None and time.monotonic() < deadline:
            time.sleep(0.02)


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory) -> dict[str, dict[int, float]]:
    """Losses of a straight 6-step run (in-process)."""
    root = tmp_path_factory.mktemp("straight")
    main(fit_args(base, root, *FAST))
    return tb_losses(root)


def test_same_seed_gives_identical_losses(straight, base, tmp_path):
    main(fit_args(base, tmp_path, *FAST))
    again = tb_losses(tmp_path)
    assert sorted(straight["train/loss"]) == list(range(6))
    for tag in LOSS_TAGS:
        assert again[tag] == straight[tag], tag
    assert any(v > 0 for v in straight["train/contrastive_loss"].values())


def test_sigint_mid_fit_saves_a_checkpoint_that_resumes_exactly(straight, base, tmp_path, capsys):
    """A real Ctrl-C (SIGINT from outside) during step 3 of a subprocess fit, then ``--ckpt_path`` in-process
    after the base model moved to another folder (the command line's model.base_model wins over the checkpoint's)."""
    marker = tmp_path / "at_step"
    interrupted = tmp_path / "interrupted_run"
    first_base = shutil.copytree(base, tmp_path / "base-here")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    args = fit_args(str(first_base), interrupted, *FAST, "--trainer.callbacks+=test_reliability.WaitForSignal",
                    "--trainer.callbacks.step=2", f"--trainer.callbacks.marker={marker}")
    proc = subprocess.Popen([sys.executable, "-m", "moelora_lit", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    ckpt = glob.glob(str(interrupted / "**" / "interrupted.ckpt"), recursive=True)
    assert len(ckpt) == 1, err[-3000:]
    assert f"interrupted: interrupted by SIGINT at global step 3; checkpoint saved to {ckpt[0]}" in err
    saved = torch.load(ckpt[0], weights_only=True)  # our own checkpoints are weights_only-safe
    assert saved["global_step"] == 3
    assert tb_losses(interrupted)["train/loss"] == {s: straight["train/loss"][s] for s in range(3)}

    resumed = tmp_path / "resumed_run"
    moved_base = shutil.move(first_base, tmp_path / "base-moved")
    code, err = run_cli(fit_args(str(moved_base), resumed, *FAST, f"--ckpt_path={ckpt[0]}"), capsys)
    assert code == 0, err
    losses = tb_losses(resumed)
    for tag in LOSS_TAGS:  # steps 3..5, across the epoch boundary at step 4, bit for bit
        assert losses[tag] == {s: straight[tag][s] for s in range(3, 6)}, tag


@pytest.mark.compiled_kernel  # exact resume with the kernel users get on CPU
def test_every_fit_leaves_a_last_checkpoint_that_resumes_exactly(base, tmp_path, capsys):
    """A fit that stops (max_steps=3) before its first validation (end of epoch, step 4) still writes
    ``checkpoints/last.ckpt``; resuming it to 6 steps gives a straight 6-step run's losses bit for bit."""
    short = [a for a in FAST if a not in ("--data.val=null", "--trainer.max_steps=6")]
    short += ["--data.val=[{name: synth_add, split: validation, limit: 4}]", "--trainer.max_steps=3"]
    code, err = run_cli(fit_args(base, tmp_path / "straight", *short, "--trainer.max_steps=6"), capsys)
    assert code == 0, err
    straight = tb_losses(tmp_path / "straight")
    code, err = run_cli(fit_args(base, tmp_path / "short", *short), capsys)
    assert code == 0, err
    (last,) = glob.glob(str(tmp_path / "short" / "**" / "checkpoints" / "last.ckpt"), recursive=True)
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed = [a for a in short if a != "--trainer.max_steps=3"] + ["--trainer.max_steps=6", f"--ckpt_path={last}"]
    code, err = run_cli(fit_args(base, tmp_path / "resumed", *resumed), capsys)
    assert code == 0, err
    losses = tb_losses(tmp_path / "resumed")
    for tag in LOSS_TAGS:
        assert losses[tag] == {s: straight[tag][s] for s in range(3, 6)}, tag
    (last,) = glob.glob(str(tmp_path / "resumed" / "**" / "checkpoints" / "last.ckpt"), recursive=True)
    assert torch.load(last, weights_only=True)["global_step"] == 6


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(base, tmp_path, capsys):
    args = fit_args(base, tmp_path, *FAST, "--model.optimizer.init_args.lr=1e30",
                    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                    "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1")
    code, err = run_cli(args, capsys)
    assert code == 1, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: non-finite training loss at global step 2"), message
    assert "train/task_loss=nan" in message and "train/contrastive_loss=" in message
    kept = [Path(p).name for p in written(tmp_path) if p.endswith(".ckpt")]
    assert kept == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]  # nothing for the bad step, no interrupt save
    assert "epoch=0-step=2.ckpt (resume with --ckpt_path" in message
    assert not any("adapter" in p for p in written(tmp_path))


def test_pickled_payload_is_refused_and_never_runs(base, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "pytorch-lightning_version": L.__version__,
                "hyper_parameters": {"x": Payload()}}, evil)
    for extra in ([], ["--weights_only=false"]):  # LightningCLI reads hyper-parameters with weights_only=True anyway
        code, err = run_cli(fit_args(base, tmp_path / "run", *FAST, f"--ckpt_path={evil}", *extra), capsys)
        assert code == 2, err
        assert "refused to load" in err and str(evil) in err and "open" in err
    assert not marker.exists()
    assert written(tmp_path / "run") == []


# ----------------------------------------------------------------------------------------- resumable loader
@pytest.mark.parametrize("num_workers", [0, 1])
def test_resumable_loader_continues_mid_epoch_and_across_epochs(num_workers):
    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(list(range(20)), batch_size=3, shuffle=True, num_workers=num_workers,
                                   generator=torch.Generator().manual_seed(0))

    straight = loader()
    epochs = [[b.tolist() for b in straight] for _ in range(2)]
    first = loader()
    it = iter(first)
    seen = [next(it).tolist() for _ in range(2)]
    state = first.state_dict()
    second = loader()
    second.load_state_dict(state)
    assert seen + [b.tolist() for b in second] == epochs[0]
    third = loader()
    third.load_state_dict(second.state_dict())  # saved at the end of the epoch: the next one starts
    assert [b.tolist() for b in third] == epochs[1]
