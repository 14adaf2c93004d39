"""Evaluation settings end to end on the tiny base: ``--model.num_beams=4`` and ``--model.answer_protocol`` work in
``test`` and are recorded per dataset in ``test_results.json``; with a ModelCheckpoint that monitors ``val/loss``,
fit's test uses the best checkpoint (as LLM-Adapters' ``load_best_model_at_end``) and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_folder import build_tiny_hf_folder

from moelora_lit.__main__ import main
from moelora_lit.lightning.module import MoELoRAModule

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.yaml"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_hf_folder(tmp_path_factory.mktemp("tiny-base"))


def _results(root: Path) -> tuple[Path, dict]:
    (path,) = root.glob("lightning_logs/version_*/test_results.json")
    return path.parent, json.loads(path.read_text())


def test_best_checkpoint_then_beam_search_test(tiny_base: str, tmp_path: Path) -> None:
    config = tmp_path / "best.yaml"
    config.write_text(f"config: {SMOKE}\n"
                      "trainer.callbacks:\n"
                      "  - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                      "    init_args: {monitor: val/loss, mode: min, save_top_k: 1, filename: \"best-{step}\"}\n")
    fit_root, test_root = tmp_path / "fit", tmp_path / "test"
    common = ["--model.base_model", tiny_base, "--model.max_new_tokens", "3", "--data.test",
              "[{name: synth_add, limit: 4}, {name: synth_units, limit: 2}]", "--data.eval_batch_size", "2"]
    main(["fit", "--config", str(config), *common, "--trainer.default_root_dir", str(fit_root),
          "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"])
    run, results = _results(fit_root)
    assert set(results) == {"synth_add", "synth_units"}
    best = results["synth_add"]["checkpoint"]
    assert Path(best).name.startswith("best-step=") and Path(best).is_file()
    assert {k: results["synth_add"][k] for k in ("protocol", "num_beams", "do_sample", "max_new_tokens",
                                                  "eval_batch_size")} == {
        "protocol": "explicit", "num_beams": 1, "do_sample": False, "max_new_tokens": 3, "eval_batch_size": 2}

    main(["test", "--config", str(SMOKE), *common, "--trainer.default_root_dir", str(test_root),
          "--model.init_adapter", str(run / "adapter"), "--model.num_beams=4",
          "--model.answer_protocol=llm_adapters"])
    _, results = _results(test_root)
    for name in ("synth_add", "synth_units"):
        assert results[name]["num_beams"] == 4 and results[name]["protocol"] == "llm_adapters"
        assert results[name]["checkpoint"] == str(run / "adapter") and results[name]["n"] in (4, 2)


def test_bad_protocol_and_beams_are_refused(tiny_base: str) -> None:
    with pytest.raises(ValueError, match="answer_protocol"):
        MoELoRAModule(base_model=tiny_base, answer_protocol="lenient")
    with pytest.raises(ValueError, match="num_beams"):
        MoELoRAModule(base_model=tiny_base, num_beams=0)
