"""Training-step and generation cost of MoELoRA against PEFT LoRA on one Llama-architecture model.

One process, one run: every variant wraps a copy of the same randomly initialised ``LlamaForCausalLM``
(fixed seed) with the same targets and rank, the variants are timed round-robin (the order rotates each
repetition) after a warm-up, and each is reported as the median step time plus its peak memory. Shapes,
variants and targets are data in ``presets.py``; timing, memory and generation live in ``measure.py``. See
``benchmarks/README.md`` for the columns and for how memory is measured.

    python benchmarks/bench.py --json bench.json                 # default size, CPU, < 3 minutes on 2 cores
    python benchmarks/bench.py --preset quickstart --json q.json # experiments/quickstart.yaml's shape
    python benchmarks/bench.py --preset llama7b_layer            # LLaMA-7B widths, 2 layers, CPU float32
    python benchmarks/bench.py --preset tiny --json out.json     # seconds (used by tests/test_bench.py)
    python benchmarks/bench.py --preset gpu --json gpu.json      # LLaMA-7B layer dims, 2 layers, bf16 autocast
    python benchmarks/bench.py --preset smollm2 --variants peft_lora,moelora --no-generate --json s.json
    python benchmarks/bench.py --preset smollm2 --variants peft_lora,moelora,loramoe,hydralora,mola,flylora,mixlora
    python benchmarks/bench.py --profile                         # also torch.profiler's top ops of each adapter's step

Every variant also gets its FLOPs (``moelora_lit.flops``, the method's own work, base model included) as a ratio to
PEFT LoRA's, and ``efficiency_vs_peft_lora = flop_ratio / step_time_ratio``: 1 when the variant's extra arithmetic
costs time in proportion, below 1 when it costs more time than its FLOPs explain.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # presets.py and measure.py beside this file

from arithmetic import variant_flops  # noqa: E402
from measure import (  # noqa: E402
    Variant,
    build_variants,
    load_1min,
    make_batch,
    median,
    quartiles,
    time_generation,
    time_steps,
)
from memory import measure_memory, profile_step  # noqa: E402
from presets import (  # noqa: E402
    BASELINE,
    DEFAULT_VARIANTS,
    DESCRIPTIONS,
    EFFICIENCY_TARGET,
    GENERATE_VARIANTS,
    PRESETS,
    VARIANTS,
    Sizes,
    targets_for,
)

from moelora_lit.machine import matmul_gflops  # noqa: E402

TARGETS = targets_for("default")  # the default preset's targets (kept for importers of bench.TARGETS)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Sizes]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda for --preset gpu, else cpu)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma list of {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--no-generate", action="store_true", help="skip the generation timing")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top ops of a step of every variant but the base and PEFT LoRA")
    parser.add_argument("--flops-only", action="store_true", help="print the FLOP ratios and stop (no timing)")
    parser.add_argument("--skip-unavailable", action="store_true",
                        help="leave out (and report) variants that cannot be built, e.g. a missing method preset")
    for f in Sizes.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        if f.name == "targets":
            parser.add_argument(flag, default=None, help="comma list of target module names")
        elif f.name == "amp":
            parser.add_argument(flag, choices=["none", "bf16"], default=None)
        else:
            kind = type(getattr(Sizes(), f.name))
            parser.add_argument(flag, type=_bool if kind is bool else kind, default=None)
    args = parser.parse_args(argv)
    values = asdict(Sizes()) | PRESETS[args.preset]
    for name in values:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given.split(",") if name == "targets" else given
    return args, Sizes(**values)


def main(argv: list[str] | None = None) -> dict:
    args, s = parse_args(argv)
    if s.threads:
        torch.set_num_threads(s.threads)
    device = torch.device(args.device or ("cuda" if args.preset == "gpu" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: --device cuda (or --preset gpu) needs a CUDA build of torch and a GPU")
    amp = torch.bfloat16 if s.amp == "bf16" else None
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or BASELINE not in names:
        raise SystemExit(f"bench.py: --variants must include {BASELINE} and name only {', '.join(VARIANTS)}")
    t_start = time.perf_counter()
    load_start = load_1min()
    gflops = matmul_gflops(device=device)

    unavailable: dict[str, str] | None = {} if args.skip_unavailable else None
    try:
        variants = build_variants(names, s, device, unavailable)
    except FileNotFoundError as err:
        raise SystemExit(f"bench.py: {err}; write it or leave the variant out of --variants") from err
    if BASELINE not in {v.name for v in variants}:
        raise SystemExit(f"bench.py: the baseline {BASELINE} could not be built: {unavailable}")
    batch = make_batch(s, device)
    real = float(batch["attention_mask"].float().mean())
    for v in variants:
        v.flops = variant_flops(v.model, v.model.config, s.seq, s.batch * s.seq, real)
    if args.flops_only:
        return print_flops(variants, unavailable or {})
    round_loads = time_steps(variants, batch, s, amp)
    for v in variants:
        v.memory = measure_memory(v, batch, amp)
    profile_rows = None
    if args.profile:
        profile_rows = {v.name: profile_step(v, batch, amp) for v in variants if v.name not in ("base", BASELINE)}
    gen_variants = [] if args.no_generate else [v for v in variants if v.name in GENERATE_VARIANTS]
    gen_tokens = time_generation(gen_variants, batch, s, amp)

    result = summarise(args, s, device, variants, gen_tokens, profile_rows, time.perf_counter() - t_start)
    result["unavailable_variants"] = unavailable or {}
    result["matmul_gflops"] = gflops
    result["load_average_at_start"] = load_start
    result["load_average_per_round"] = round_loads     # 1-minute load before each timed round
    busy = load_start is not None and device.type == "cpu" and load_start >= 0.5 * (os.cpu_count() or 1)
    result["machine_busy_at_start"] = busy
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


def variant_row(v: Variant, ref: Variant, s: Sizes, gen_tokens: dict) -> dict:
    """One variant's timings, memory and ratios to the baseline ``ref``."""
    q1, q3 = quartiles(v.step_ms)
    step = median(v.step_ms)
    paired = [a / b for a, b in zip(v.step_ms, ref.step_ms, strict=True)]  # each round against its own baseline
    paired_cpu = [a / b for a, b in zip(v.step_cpu_ms, ref.step_cpu_ms, strict=True)]
    row = {
        "description": DESCRIPTIONS[v.name].format(**asdict(s)),
        "step_ms_median": step, "step_ms_min": min(v.step_ms), "step_ms_q1": q1, "step_ms_q3": q3,
        "step_ms_all": v.step_ms, "first_step_ms": v.first_step_ms,
        "step_cpu_ms_median": median(v.step_cpu_ms), "step_cpu_ms_all": v.step_cpu_ms,
        "step_cpu_ratio_vs_peft_lora": median(v.step_cpu_ms) / median(ref.step_cpu_ms),
        "step_time_ratio_vs_peft_lora": step / median(ref.step_ms),
        "paired_step_time_ratio_vs_peft_lora": median(paired),
        "paired_step_time_ratios_all": paired,
        "paired_step_cpu_ratio_vs_peft_lora": median(paired_cpu),
        **v.memory,
        "peak_memory_ratio_vs_peft_lora": v.memory["peak_memory_mb"] / ref.memory["peak_memory_mb"],
        "step_transient_ratio_vs_peft_lora": v.memory["step_transient_peak_mb"] / ref.memory["step_transient_peak_mb"],
        "trainable_params": sum(p.numel() for p in v.trainable),
        **v.flops,
        "flop_ratio_vs_peft_lora": v.flops["step_flops"] / ref.flops["step_flops"],
        "executed_flop_ratio_vs_peft_lora": v.flops["step_flops_executed"] / ref.flops["step_flops_executed"],
    }
    row["efficiency_vs_peft_lora"] = row["flop_ratio_vs_peft_lora"] / row["step_time_ratio_vs_peft_lora"]
    row["paired_efficiency_vs_peft_lora"] = row["flop_ratio_vs_peft_lora"] / row["paired_step_time_ratio_vs_peft_lora"]
    if v.gen_ms:
        row.update(generate_ms_median=median(v.gen_ms), generate_ms_all=v.gen_ms,
                   generate_new_tokens=gen_tokens[v.name])
        if ref.gen_ms:
            row["generate_time_ratio_vs_peft_lora"] = median(v.gen_ms) / median(ref.gen_ms)
            row["paired_generate_time_ratio_vs_peft_lora"] = median(
                [a / b for a, b in zip(v.gen_ms, ref.gen_ms, strict=True)])
    return row


def summarise(args, s: Sizes, device: torch.device, variants: list[Variant], gen_tokens: dict,
              profile_rows, wall_s: float) -> dict:
    by = {v.name: v for v in variants}
    rows = {v.name: variant_row(v, by[BASELINE], s, gen_tokens) for v in variants}
    targets = targets_for(args.preset)
    result: dict = {
        "benchmark": "moelora_lit benchmarks/bench.py",
        "preset": args.preset,
        "sizes": asdict(s),
        "variants": rows,
        "torch_version": torch.__version__,
        "transformers_version": _version("transformers"),
        "peft_version": _version("peft"),
        "python_version": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": wall_s,
        "targets": targets,
    }
    moe = rows.get("moelora")
    if moe is not None:
        for key in ("step_time_ratio_vs_peft_lora", "paired_step_time_ratio_vs_peft_lora",
                    "paired_step_cpu_ratio_vs_peft_lora", "peak_memory_ratio_vs_peft_lora",
                    "step_transient_ratio_vs_peft_lora", "flop_ratio_vs_peft_lora", "efficiency_vs_peft_lora",
                    "paired_efficiency_vs_peft_lora", "paired_generate_time_ratio_vs_peft_lora"):
            if key in moe:
                result[key] = moe[key]
        if "generate_ms_median" in moe and "generate_ms_median" in rows[BASELINE]:
            result["generate_time_ratio_vs_peft_lora"] = (moe["generate_ms_median"]
                                                          / rows[BASELINE]["generate_ms_median"])
        if "moelora_no_cl" in rows:
            result["contrastive_overhead"] = moe["step_ms_median"] / rows["moelora_no_cl"]["step_ms_median"] - 1
            paired = [a / b for a, b in zip(by["moelora"].step_ms, by["moelora_no_cl"].step_ms, strict=True)]
            result["paired_contrastive_overhead"] = median(paired) - 1
    result["targets_met"] = {k: result[k] <= t for k, t in targets.items() if k in result}
    # Every family method (not the base, LoRA or MoELoRA's ablations) against the efficiency target.
    family = {name: row for name, row in rows.items() if name not in ("base", BASELINE, "moelora_no_cl",
                                                                       "moelora_dense")}
    result["efficiency_target"] = EFFICIENCY_TARGET
    result["efficiency_targets_met"] = {name: {"ratio_of_medians": row["efficiency_vs_peft_lora"] >= EFFICIENCY_TARGET,
                                               "paired": row["paired_efficiency_vs_peft_lora"] >= EFFICIENCY_TARGET}
                                        for name, row in family.items()}
    if profile_rows:
        result["profile_top_ops"] = profile_rows
        if "moelora" in profile_rows:
            result["profile_moelora_top_ops"] = profile_rows["moelora"]
    return result


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - informational only
        return None


def print_flops(variants: list[Variant], unavailable: dict[str, str]) -> dict:
    """Each variant's step FLOPs against PEFT LoRA's (method's own work; executed by the package's layers)."""
    ref = next(v for v in variants if v.name == BASELINE).flops
    ratios = {v.name: {"flop_ratio_vs_peft_lora": v.flops["step_flops"] / ref["step_flops"],
                       "executed_flop_ratio_vs_peft_lora": v.flops["step_flops_executed"] / ref["step_flops_executed"],
                       **v.flops} for v in variants}
    print(f"{'variant':<15}{'adapter/token':>15}{'base/token':>14}{'FLOPs ratio':>13}{'executed':>10}")
    for name, row in ratios.items():
        print(f"{name:<15}{row['adapter_flops_per_token']:>15.4g}{row['base_flops_per_token']:>14.4g}"
              f"{row['flop_ratio_vs_peft_lora']:>13.3f}{row['executed_flop_ratio_vs_peft_lora']:>10.3f}")
    for name, why in unavailable.items():
        print(f"{name:<15}not built: {why}")
    return {"variants": ratios, "unavailable_variants": unavailable}


def print_report(r: dict) -> None:
    s = r["sizes"]
    print(f"\nmoelora_lit benchmark ({r['preset']}): {s['layers']} layers, hidden {s['hidden']}, "
          f"batch {s['batch']} x seq {s['seq']}, r={s['rank']}, targets {','.join(s['targets'])}, "
          f"device {r['device']} ({r['threads']} threads), torch {r['torch_version']}")
    header = (f"{'variant':<15}{'step ms':>10}{'[q1, q3]':>20}{'ratio':>8}{'paired':>8}{'cpu ms':>10}{'paired':>8}"
              f"{'peak MB':>10}{'ratio':>8}{'step MB':>10}{'ratio':>8}{'gen ms':>10}{'ratio':>8}"
              f"{'FLOPs':>8}{'effic.':>8}{'p.eff.':>8}")
    print(header)
    print("-" * len(header))
    ref_gen = r["variants"][BASELINE].get("generate_ms_median")
    for name, row in r["variants"].items():
        gen = row.get("generate_ms_median")
        gen_s = f"{gen:>10.1f}{gen / ref_gen:>8.3f}" if gen is not None and ref_gen else f"{'':>18}"
        spread = f"[{row['step_ms_q1']:.1f}, {row['step_ms_q3']:.1f}]"
        print(f"{name:<15}{row['step_ms_median']:>10.1f}{spread:>20}{row['step_time_ratio_vs_peft_lora']:>8.3f}"
              f"{row['paired_step_time_ratio_vs_peft_lora']:>8.3f}"
              f"{row['step_cpu_ms_median']:>10.1f}{row['paired_step_cpu_ratio_vs_peft_lora']:>8.3f}"
              f"{row['peak_memory_mb']:>10.1f}{row['peak_memory_ratio_vs_peft_lora']:>8.3f}"
              f"{row['step_transient_peak_mb']:>10.1f}{row['step_transient_ratio_vs_peft_lora']:>8.3f}{gen_s}"
              f"{row['flop_ratio_vs_peft_lora']:>8.3f}{row['efficiency_vs_peft_lora']:>8.3f}"
              f"{row['paired_efficiency_vs_peft_lora']:>8.3f}")
    for name, why in r.get("unavailable_variants", {}).items():
        print(f"{name:<15}not measured: {why}")
    print("ratio: of medians; paired: median of each round's own ratio (wall, then CPU time); FLOPs: step FLOPs "
          "(base + adapter, method's own work) / PEFT LoRA's; effic.: FLOPs ratio / step ratio; p.eff.: with the "
          "paired step ratio")
    eff = r.get("efficiency_targets_met") or {}
    if eff:
        print(f"efficiency >= {r['efficiency_target']:g}: " + ", ".join(
            f"{name} {'met' if ok['paired'] else 'NOT met'} (paired), {'met' if ok['ratio_of_medians'] else 'NOT met'}"
            " (medians)" for name, ok in eff.items()))
    print()
    targets = r["targets"]
    for key in ("step_time_ratio_vs_peft_lora", "paired_step_time_ratio_vs_peft_lora",
                "paired_step_cpu_ratio_vs_peft_lora", "peak_memory_ratio_vs_peft_lora",
                "generate_time_ratio_vs_peft_lora", "paired_generate_time_ratio_vs_peft_lora", "contrastive_overhead",
                "paired_contrastive_overhead"):
        if key not in r:
            continue
        verdict = f"  (target <= {targets[key]:g}: {'met' if r['targets_met'][key] else 'NOT met'})" \
            if key in targets else ""
        print(f"{key:<36}{r[key]:>8.3f}{verdict}")
    first = {name: row["first_step_ms"] for name, row in r["variants"].items() if row.get("first_step_ms")}
    if first:  # MoELoRA's first step compiles the CPU contrastive kernel (once per process)
        print("first step ms (one-time work included): " + ", ".join(f"{n} {ms:.0f}" for n, ms in first.items()))
    for name, rows in (r.get("profile_top_ops") or {}).items():
        print(f"\ntorch.profiler, {name} step, top ops by self CPU time:")
        for row in rows:
            print(f"  {row['op']:<44}{row['self_cpu_ms_per_step']:>9.2f} ms/step {row['self_cpu_share']:>7.1%}"
                  f"{row['calls_per_step']:>8.0f} calls")
    print(f"float32 matmul 1024x1024: {r['matmul_gflops']:.1f} GFLOPS at {r['threads']} threads")
    loads = [x for x in r.get("load_average_per_round") or [] if x is not None]
    spread = f", {min(loads):.1f}-{max(loads):.1f} over the timed rounds" if loads else ""
    print(f"wall {r['wall_s']:.0f} s, load average {r['load_average']} (1-minute at start "
          f"{r['load_average_at_start']}{spread})")
    if r.get("machine_busy_at_start"):
        print(f"WARNING: 1-minute load average was {r['load_average_at_start']:.1f} on {r['cpu_count']} CPUs at the "
              "start: other processes compete for the cores, so these timings are noisy; compare ratios, look at "
              "the cpu ms column, try --threads 1, and re-run on a quiet machine before quoting them.")


if __name__ == "__main__":
    main()
