"""End to end: a tiny ablation through the real driver code (5 methods, a 2-point sweep, 2 seeds, 3 steps), and
both notebooks executed with nbclient from the committed results
(``experiments/studies/cpu_ablation/results/ablation_*``).

The tiny runs go through :func:`moelora_lit.analysis.run_ablation` in this process (``isolate=False``: it saves
interpreter start-ups; ``experiments/studies/cpu_ablation/driver.py`` runs each in its own process).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from hf_folder import build_tiny_hf_folder

from moelora_lit import analysis

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.yaml"
NOTEBOOKS = [ROOT / "notebooks" / "ablation.ipynb", ROOT / "notebooks" / "routing_analysis.ipynb"]
TASKS = ["synth_add", "synth_units"]


@pytest.mark.slow
def test_tiny_ablation_sweeps_on_validation_and_writes_the_committed_layout(tmp_path, capsys):
    base = build_tiny_hf_folder(tmp_path / "tiny-base")
    extra = [f"--model.base_model={base}", "--trainer.max_steps=3", "--trainer.log_every_n_steps=1",
             "--trainer.limit_val_batches=0", "--model.max_new_tokens=4", "--trainer.enable_model_summary=false",
             "--data.train=[{name: synth_all, limit: 48}]", "--data.val=null",
             f"--data.test={analysis.eval_datasets(TASKS, limit=8)}"]
    out, results = tmp_path / "runs", tmp_path / "results"
    grid = {m: [1e-3] for m in analysis.METHODS} | {"moelora": [1e-3, 3e-3]}
    df = analysis.run_ablation(SMOKE, out, grid, seeds=(0, 1), extra_args=extra, results_dir=results,
                               isolate=False, steps=3)
    assert sorted(df["method"].unique()) == sorted(analysis.METHODS)
    assert set(df["task"]) == set(TASKS) and (df["split"] == "test").all() and (df["n"] == 8).all()
    assert {"method", "seed", "task", "accuracy", "n", "lr", "alpha", "effective_n"} <= set(df.columns)
    assert set(df[df.method == "lora_scaled"]["alpha"]) == {32.0 * 4}      # smoke.yaml: alpha 32, 4 experts
    assert set(df[df.method == "lora"]["alpha"]) == {32.0}
    sweep = pd.read_csv(results / "ablation_sweep.csv")
    assert (sweep["split"] == "validation").all() and set(sweep["seed"]) == {0}
    assert len(sweep[sweep.method == "moelora"].drop_duplicates("lr")) == 2
    chosen = json.loads((results / "ablation_chosen.json").read_text())
    assert chosen["chosen"]["moelora"]["lr"] in (1e-3, 3e-3) and chosen["steps"] == 3
    assert set(df[df.method == "moelora"]["lr"]) == {chosen["chosen"]["moelora"]["lr"]}
    params = df.groupby("method")["trainable_params"].first()
    assert params["moelora"] == params["moelora_no_contrastive"] > params["lora"] == params["lora_scaled"]
    assert params["lora"] == params["moelora_random_router"]   # a rank-r LoRA's parameters, neither has a router
    summaries = analysis.load_summaries(results / "ablation_routing")
    assert {m for m, _ in summaries} == {"moelora", "moelora_no_contrastive", "moelora_random_router"}
    one = summaries[("moelora", 1)]
    assert len(one["layers"]) == len(one["trained"]["p"]) == len(one["step0"]["entropy"])
    assert set(one["trained"]["use"]) == set(one["tasks"])
    capsys.readouterr()
    again = analysis.run_ablation(SMOKE, out, grid, seeds=(0, 1), results_dir=results, isolate=False, steps=3)
    assert capsys.readouterr().out.count("skipped") == 6 + 10      # the sweep runs, then the final runs
    pd.testing.assert_frame_equal(again, df)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_from_committed_results(path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.delenv("MOELORA_RESULTS", raising=False)
    nb = nbformat.read(path, as_version=4)
    # "python3" is ipykernel's own kernel spec: jupyter_client finds it even when no kernel.json was installed.
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert "experiments/studies/cpu_ablation/results" in "".join(o.get("text", "") for o in outputs)
