"""Scaling curves: step time and peak memory of MoELoRA against experts, queue size, tokens per step and top-k.

Starts from a preset's shape (default ``quickstart``) and changes one knob at a time. At every point
``moelora``, ``moelora_no_cl`` and ``peft_lora`` are built from the same base weights and timed round-robin
(``measure.time_steps``), then each step's peak memory is measured (``memory.measure_memory``). Writes
``<out>/scaling.json`` and ``<out>/scaling.csv`` (one row per point and variant) and a plot.

    python benchmarks/scaling.py                                   # quickstart shape, a few minutes on 2 cores
    python benchmarks/scaling.py --sweeps queue,top_k --reps 5     # some sweeps, more repetitions
    python benchmarks/scaling.py --preset tiny --limit 2 --out /tmp/s --plot /tmp/s.png   # seconds (tests)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # presets.py and measure.py beside this file

from measure import build_variants, make_batch, median, quartiles, time_steps  # noqa: E402
from memory import measure_memory  # noqa: E402
from presets import BASELINE, PRESETS, Sizes  # noqa: E402

from moelora_lit.machine import matmul_gflops  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANT_NAMES = ["peft_lora", "moelora", "moelora_no_cl"]
# Sweep name -> values; each point changes one Sizes field of the preset (``tokens`` changes the batch size).
SWEEPS: dict[str, list[int]] = {
    "experts": [1, 2, 4, 8, 16],
    "queue": [32, 64, 128, 256, 512, 1024],
    "tokens": [4, 8, 16, 32],  # batch rows of ``seq`` tokens
    "top_k": [1, 2, 4, 8],
}
FIELD = {"experts": "experts", "queue": "queue", "tokens": "batch", "top_k": "top_k"}
LABEL = {"experts": "experts N", "queue": "queue size Q (per expert)", "tokens": "tokens per step (batch x seq)",
         "top_k": "top-k"}


def point_sizes(base: Sizes, sweep: str, value: int) -> Sizes | None:
    """The shape of one point, or None where it is invalid (r % N != 0, top-k > N)."""
    s = dataclasses.replace(base, **{FIELD[sweep]: value})
    if sweep == "experts":
        s = dataclasses.replace(s, top_k=min(s.top_k, value))
    if s.rank % s.experts or s.top_k > s.experts:
        return None
    return s


def measure_point(s: Sizes, device: torch.device) -> list[dict]:
    """Round-robin step times and per-variant peak memory at shape ``s``: one row per variant."""
    variants = build_variants(VARIANT_NAMES, s, device)
    batch = make_batch(s, device)
    time_steps(variants, batch, s, None)
    rows = []
    for v in variants:
        q1, q3 = quartiles(v.step_ms)
        rows.append({"variant": v.name, "step_ms_median": median(v.step_ms), "step_ms_q1": q1, "step_ms_q3": q3,
                     "step_cpu_ms_median": median(v.step_cpu_ms), **measure_memory(v, batch, None)})
    by = {r["variant"]: r for r in rows}
    ref = by[BASELINE]
    for r in rows:
        r["step_time_ratio_vs_peft_lora"] = r["step_ms_median"] / ref["step_ms_median"]
        r["peak_memory_ratio_vs_peft_lora"] = r["peak_memory_mb"] / ref["peak_memory_mb"]
        r["contrastive_overhead"] = by["moelora"]["step_ms_median"] / by["moelora_no_cl"]["step_ms_median"] - 1
        r.pop("method")
    return rows


def schedule(sweeps: list[str], limit: int) -> list[tuple[str, int]]:
    """(sweep, value) points, the sweeps interleaved so that a run cut short by its budget covers every sweep."""
    values = {w: SWEEPS[w][:limit or None] for w in sweeps}
    longest = max(len(v) for v in values.values())
    return [(w, values[w][i]) for i in range(longest) for w in sweeps if i < len(values[w])]


def run(base: Sizes, sweeps: list[str], limit: int, device: torch.device, budget_s: float,
        save: Callable[[list[dict]], None]) -> list[dict]:
    """Every point (until ``budget_s`` is spent); prints a line and calls ``save(rows)`` after each point."""
    rows: list[dict] = []
    t_start = time.perf_counter()
    for sweep, value in schedule(sweeps, limit):
        if budget_s and time.perf_counter() - t_start > budget_s:
            print(f"budget of {budget_s:.0f} s spent: {sweep}={value} and later points not measured")
            break
        s = point_sizes(base, sweep, value)
        if s is None:
            print(f"{sweep}={value}: skipped (r={base.rank} % experts or top-k > experts)")
            continue
        t0 = time.perf_counter()
        point = measure_point(s, device)
        shape = {"sweep": sweep, "value": value, "experts": s.experts, "queue": s.queue, "batch": s.batch,
                 "seq": s.seq, "tokens": s.batch * s.seq, "top_k": s.top_k}
        rows.extend(shape | r for r in point)
        ms = {r["variant"]: r["step_ms_median"] for r in point}
        mb = {r["variant"]: r["peak_memory_mb"] for r in point}
        print(f"{sweep}={value:<5} step ms " + " ".join(f"{k} {v:7.1f}" for k, v in ms.items())
              + " | peak MB " + " ".join(f"{k} {v:6.1f}" for k, v in mb.items())
              + f" | {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
        save(rows)
    return rows


def plot(rows: list[dict], sweeps: list[str], path: Path, title: str) -> None:
    """Per sweep: step time and peak memory per variant, and the step split into the two terms above LoRA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(sweeps), figsize=(4 * len(sweeps), 9.5), squeeze=False)
    for col, sweep in enumerate(sweeps):
        curves: dict[str, dict[int, tuple[float, float]]] = {}
        for r in rows:
            if r["sweep"] == sweep:
                x = r["tokens"] if sweep == "tokens" else r["value"]
                curves.setdefault(r["variant"], {})[x] = (r["step_ms_median"], r["peak_memory_mb"])
        for name, pts in curves.items():
            xs = sorted(pts)
            axes[0, col].plot(xs, [pts[x][0] for x in xs], marker="o", label=name)
            axes[1, col].plot(xs, [pts[x][1] for x in xs], marker="o", label=name)
        if all(n in curves for n in VARIANT_NAMES):
            xs = sorted(curves["moelora"])
            cl = [curves["moelora"][x][0] - curves["moelora_no_cl"][x][0] for x in xs]
            moe = [curves["moelora_no_cl"][x][0] - curves[BASELINE][x][0] for x in xs]
            axes[2, col].plot(xs, cl, marker="o", color="C1", label="contrastive: moelora - moelora_no_cl")
            axes[2, col].plot(xs, moe, marker="s", color="C2", label="routing + experts: moelora_no_cl - peft_lora")
            axes[2, col].axhline(0, color="grey", lw=0.8)
        for row, ylabel in enumerate(("step ms (median)", "peak MB (step)", "ms above PEFT LoRA")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel(LABEL[sweep])
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[2, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quickstart", help="shape every sweep starts at")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma list of {', '.join(SWEEPS)}")
    parser.add_argument("--limit", type=int, default=0, help="only the first N values of each sweep (0: all)")
    parser.add_argument("--warmup", type=int, default=2, help="steps per variant before timing (fills the queues)")
    parser.add_argument("--reps", type=int, default=3, help="round-robin rounds per point")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the preset's)")
    parser.add_argument("--budget-s", type=float, default=0, help="start no new point after this many seconds")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for scaling.json / .csv")
    parser.add_argument("--plot", type=Path, default=HERE / "scaling.png")
    args = parser.parse_args(argv)
    sweeps = [w.strip() for w in args.sweeps.split(",") if w.strip()]
    if set(sweeps) - set(SWEEPS):
        raise SystemExit(f"scaling.py: --sweeps names only {', '.join(SWEEPS)}")
    base = dataclasses.replace(Sizes(**PRESETS[args.preset]), warmup=args.warmup, reps=args.reps)
    if args.threads is not None:
        base = dataclasses.replace(base, threads=args.threads)
    if base.threads:
        torch.set_num_threads(base.threads)
    device = torch.device("cpu")

    t0, load_start = time.perf_counter(), os.getloadavg()
    gflops = matmul_gflops()
    print(f"float32 matmul 1024x1024: {gflops:.1f} GFLOPS at {torch.get_num_threads()} threads; load {load_start}")
    result = {"benchmark": "moelora_lit benchmarks/scaling.py", "preset": args.preset,
              "base_sizes": dataclasses.asdict(base), "sweeps": {w: SWEEPS[w] for w in sweeps},
              "threads": torch.get_num_threads(), "matmul_gflops": gflops, "torch_version": torch.__version__,
              "load_average_at_start": list(load_start)}

    def save(rows: list[dict]) -> None:
        result.update(load_average_at_end=list(os.getloadavg()), wall_s=time.perf_counter() - t0, rows=rows)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scaling.json").write_text(json.dumps(result, indent=2))
        with open(args.out / "scaling.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    rows = run(base, sweeps, args.limit, device, args.budget_s, save)
    if not rows:
        raise SystemExit("scaling.py: no point measured")
    title = (f"{args.preset} shape ({base.layers} layers, hidden {base.hidden}, {len(base.targets)} targets, "
             f"r={base.rank}); base point N={base.experts}, Q={base.queue}, {base.batch}x{base.seq} tokens, "
             f"top-{base.top_k}; {torch.get_num_threads()} threads, matmul {gflops:.0f} GFLOPS")
    plot(rows, sweeps, args.plot, title)
    print(f"wrote {args.out / 'scaling.json'}, {args.out / 'scaling.csv'}, {args.plot} "
          f"in {result['wall_s']:.0f} s; load {result['load_average_at_end']}")
    return result


if __name__ == "__main__":
    main()
