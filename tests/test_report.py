"""``report`` builds the dataset x method table from several run folders with different methods and seeds."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from moelora_lit.__main__ import main as cli_main
from moelora_lit.eval.report import collect, summarise
from moelora_lit.eval.stats import mean_ci, t_critical

ACC = {  # method -> seed -> dataset -> accuracy
    "lora": {0: {"gsm8k": 0.30, "svamp": 0.50, "addsub": 0.80}, 1: {"gsm8k": 0.32, "svamp": 0.52, "addsub": 0.82},
             2: {"gsm8k": 0.34, "svamp": 0.48, "addsub": 0.84}},
    "moelora": {0: {"gsm8k": 0.40, "svamp": 0.55, "addsub": 0.85}, 1: {"gsm8k": 0.36, "svamp": 0.57, "addsub": 0.83}},
}


def _write_run(folder: Path, seed: int, results: dict[str, float], method: str | None, adapter: dict) -> None:
    log = folder / "lightning_logs" / "version_0"
    log.mkdir(parents=True)
    entry = {"n": 100, "protocol": "llm_adapters", "num_beams": 4, "max_new_tokens": 256, "do_sample": False}
    (log / "test_results.json").write_text(json.dumps({d: {"accuracy": a, **entry} for d, a in results.items()}))
    (log / "config.yaml").write_text(yaml.safe_dump({"seed_everything": seed, "model": {"adapter": adapter}}))
    if method:
        (folder / "run.json").write_text(json.dumps({"method": method, "seed": seed}))


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    for method, seeds in ACC.items():
        for seed, results in seeds.items():
            adapter = {"r": 32, "num_experts": 8, "top_k": 2, "target_modules": ["q_proj", "v_proj"]}
            _write_run(tmp_path / "runs" / method / f"seed{seed}", seed, results,
                       method if method == "lora" else None, adapter)  # moelora: named from its config.yaml
    return tmp_path / "runs"


def test_t_interval_values():
    assert t_critical(2) == pytest.approx(4.303, abs=1e-3) and t_critical(29) == pytest.approx(2.045, abs=1e-3)
    mean, half = mean_ci([30.0, 32.0, 34.0])
    assert mean == pytest.approx(32.0) and half == pytest.approx(4.303 * 2.0 / math.sqrt(3), rel=1e-3)
    assert math.isnan(mean_ci([1.0])[1])


def test_report_table_from_several_methods_and_seeds(runs: Path, tmp_path: Path, capsys) -> None:
    rows = summarise(collect([runs / "lora", runs / "moelora"]))
    cell = {(r["method"], r["dataset"]): r for r in rows}
    moelora = "MoELoRA r32 N8 top2 [q,v]"
    assert cell[("lora", "gsm8k")]["n_seeds"] == 3 and cell[("lora", "gsm8k")]["mean"] == pytest.approx(32.0)
    assert cell[(moelora, "gsm8k")]["seeds"] == "0 1" and cell[(moelora, "gsm8k")]["mean"] == pytest.approx(38.0)
    average = [100 * (ACC["lora"][s]["gsm8k"] + ACC["lora"][s]["svamp"]) / 2 for s in range(3)]  # addsub: †
    assert cell[("lora", "average")]["mean"] == pytest.approx(sum(average) / 3)
    assert cell[("lora", "average")]["ci95_half_width"] == pytest.approx(mean_ci(average)[1])

    out_csv, out_md = tmp_path / "table.csv", tmp_path / "table.md"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["report", str(runs), "--csv", str(out_csv), "--out", str(out_md)])
    assert exit_.value.code == 0
    table = capsys.readouterr().out
    assert table == out_md.read_text().rstrip("\n") + "\n"
    header = table.splitlines()[0]
    assert "lora" in header and moelora in header and "LoRA (LLM-Adapters), math (published)" in header
    gsm8k = next(line for line in table.splitlines() if line.startswith("| gsm8k |"))
    assert "32.0 ± 5.0 (n=3)" in gsm8k and "38.0 ± 25.4 (n=2)" in gsm8k and "37.5" in gsm8k
    assert "| addsub † |" in table and "contaminated by math_10k" in table
    assert "protocol llm_adapters, num_beams 4" in table
    written = list(csv.DictReader(out_csv.open()))
    assert {r["source"] for r in written} >= {"ours"} and any("published" in r["method"] for r in written)
    assert len([r for r in written if r["source"] == "ours"]) == len(rows)


def test_report_fails_clearly_without_results(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["report", str(tmp_path)])
    assert exit_.value.code == 2 and "no test_results.json" in capsys.readouterr().err
