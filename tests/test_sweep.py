"""``scripts/sweep.py``: configs x seeds, finished runs skipped, ``--print`` one command per run, and one real
(tiny) run whose folder ``report`` reads."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "smoke.yaml"


def _sweep():
    spec = importlib.util.spec_from_file_location("sweep", REPO / "scripts" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sweep"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_print_lists_unfinished_runs_only(tmp_path: Path, capsys) -> None:
    sweep = _sweep()
    configs = [str(REPO / "experiments" / f"llama7b_math_{m}.yaml") for m in ("lora", "moelora_experts4")]
    done = tmp_path / "llama7b_math_lora" / "seed1" / "lightning_logs" / "version_0"
    done.mkdir(parents=True)
    (done / "test_results.json").write_text("{}")
    assert sweep.main(["--configs", *configs, "--seeds", "0", "1", "--out", str(tmp_path), "--print",
                       "--", "--model.base_model", "/models/llama 7b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # 2 configs x 2 seeds, one finished
    pairs = {(Path(shlex.split(x)[3]).stem, shlex.split(x)[5]) for x in lines}
    assert pairs == {("llama7b_math_lora", "0"), ("llama7b_math_moelora_experts4", "0"),
                     ("llama7b_math_moelora_experts4", "1")}
    assert all(shlex.split(x)[-2:] == ["--model.base_model", "/models/llama 7b"] for x in lines)


def test_fit_command_sets_seed_folder_and_resumes(tmp_path: Path) -> None:
    sweep = _sweep()
    (run,) = sweep.plan([str(SMOKE)], [7])
    folder = sweep.run_dir(tmp_path, run)
    assert folder == tmp_path / "smoke" / "seed7"
    cmd = sweep.fit_command(run, folder, ["--trainer.max_steps", "2"])
    assert cmd[cmd.index("--seed_everything") + 1] == "7" and cmd[cmd.index("--data.seed") + 1] == "7"
    assert cmd[cmd.index("--trainer.default_root_dir") + 1] == str(folder)
    last = folder / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    assert sweep.fit_command(run, folder, [])[-2:] == ["--ckpt_path", str(last)]
    with pytest.raises(FileNotFoundError):
        sweep.plan(["nope.yaml"], [0])


def test_one_real_run_then_skip_and_report(tmp_path: Path, capsys) -> None:
    sweep = _sweep()
    extra = ["--", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--model.max_new_tokens", "2",
             "--data.test", "[{name: synth_add, limit: 2}]"]
    assert sweep.main(["--configs", str(SMOKE), "--seeds", "3", "--out", str(tmp_path), *extra]) == 0
    meta = json.loads((tmp_path / "smoke" / "seed3" / "run.json").read_text())
    assert (meta["method"], meta["seed"]) == ("smoke", 3)
    capsys.readouterr()
    assert sweep.main(["--configs", str(SMOKE), "--seeds", "3", "--out", str(tmp_path), *extra]) == 0
    assert "1 finished, 0 to run" in capsys.readouterr().err

    from moelora_lit.eval.report import collect, summarise

    (row,) = summarise(collect([tmp_path]))
    assert (row["method"], row["dataset"], row["seeds"]) == ("smoke", "synth_add", "3")
