"""The SmolLM2-135M methods study's sizing: each arm's trainable count and FLOPs (``driver.py params``) and its
seconds per step measured alone (``driver.py steptime``)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from methods_protocol import RESULTS, arms, read_arms

from moelora_lit.analysis.logs import newest
from moelora_lit.analysis.runner import Job, run_jobs
from moelora_lit.analysis.study import Study


def write_params(results: Path = RESULTS) -> pd.DataFrame:
    """``params.csv``: each arm's trainable count (the configs built on the meta device) against LoRA r 32's."""
    from moelora_lit.flops import adapter_flops_per_token, base_flops_per_token
    from moelora_lit.lightning.describe_run import describe_config

    table = read_arms()
    rows, flops = [], []
    for arm, spec in table.items():
        args = [x for c in spec["configs"] for x in ("--config", c)]
        d = describe_config(args)
        rows.append({"arm": arm, "rank": spec["rank"], "trainable_params": d["trainable_params"]})
        flops.append({"arm": arm, "adapter_executed": adapter_flops_per_token(d, executed=True)["matmul"],
                      "adapter_method": adapter_flops_per_token(d)["matmul"]})
    frame = pd.DataFrame(rows)
    frame["ratio_to_lora"] = (frame["trainable_params"] / frame.loc[frame["arm"] == "lora", "trainable_params"].iloc[0]
                              ).round(4)
    frame.to_csv(results / "params.csv", index=False)
    # matmul FLOPs per token of a training step (forward + backward, moelora_lit.flops; auxiliary terms not
    # counted), the load-free side of the cost: the adapter as the package runs it and as the method defines it
    # (only the routed experts), and the frozen base at 64 positions
    base = base_flops_per_token({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                                 "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}, 64)
    cost = pd.DataFrame(flops)
    cost["base_seq64"] = base["total"]
    lora = cost.loc[cost["arm"] == "lora", "adapter_executed"].iloc[0]
    cost["step_ratio_to_lora"] = ((cost["base_seq64"] + cost["adapter_executed"]) / (base["total"] + lora)).round(4)
    cost.to_csv(results / "flops.csv", index=False, float_format="%.6g")
    print(frame.to_string(index=False), cost.to_string(index=False), sep="\n")
    return frame


def step_times(out: Path, jobs: int, steps: int = 8, results: Path = RESULTS) -> None:
    """Seconds per training step of every arm (``steps`` steps, one thread each, ``jobs`` at a time): the median
    of the wall-time differences of successive logged losses; ``step_times.csv`` and the machine's GFLOPS."""
    from moelora_lit.analysis.logs import read_scalars, seconds_per_step
    from moelora_lit.analysis.runner import fit_command
    from moelora_lit.machine import matmul_gflops

    spec = arms()
    variants = {name: Study.variant(name, {k: v[0] for k, v in a.grid.items()}) for name, a in spec.items()}
    todo = []
    for name, a in spec.items():
        folder = out / "steptime" / variants[name]
        extra = [f"--{k}={v[0]}" for k, v in a.grid.items()] + [
            f"--trainer.max_steps={steps}", "--trainer.log_every_n_steps=1", "--test_after_fit=false",
            "--trainer.limit_val_batches=0"]
        todo.append(Job(f"steptime {name}", folder, fit_command(a.configs, folder, 0, extra),
                        done=lambda f: newest(f, "adapter.safetensors") is not None))
    before = matmul_gflops(threads=2, reps=3, inner=30)
    failed = run_jobs(todo, jobs=jobs, threads=1)
    after = matmul_gflops(threads=2, reps=3, inner=30)
    rows = []
    for name in spec:
        adapter = newest(out / "steptime" / variants[name], "adapter.safetensors")
        scalars = read_scalars(adapter.parents[1]) if adapter else None
        rows.append({"arm": name, "steps": steps, "s_per_step": seconds_per_step(scalars) if adapter else None})
    frame = pd.DataFrame(rows)
    frame.to_csv(results / "step_times.csv", index=False)
    note = (f"float32 1024x1024 matmul, 2 threads: {before:.0f} GFLOPS before, {after:.0f} after "
            f"(load average {os.getloadavg()[0]:.1f}); {jobs} arm(s) at a time, 1 thread each\n")
    (results / "step_times.txt").write_text(note)
    print(frame.to_string(index=False), note, failed, sep="\n")
