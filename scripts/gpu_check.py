"""The GPU acceptance checks in one run (under 8 minutes on one H100): prints a table and writes JSON.

    python scripts/gpu_check.py --json gpu_check.json        # CUDA: every check at its real size
    python scripts/gpu_check.py --cpu --json cpu_check.json  # CPU: each check scaled down, CUDA-only ones skipped

Checks:
  bf16_train      smoke config on SmolLM2-135M-Instruct (moelora_lit.models.gguf.SMOLLM2), 20 steps, bf16-mixed, with
                  torch.cuda.set_sync_debug_mode("error") around forward, loss, backward and the queue push of step 3
                  (faults.check_finite off: its one deliberate host sync per step). CPU: the tiny base, 2 steps.
  bench_default   benchmarks/bench.py --preset default on CUDA: step <= 1.10, memory <= 1.05, generation <= 1.10 of
  bench_7b_layer  PEFT LoRA (and --preset llama7b_layer). CPU: --preset tiny, ratios reported, no target.
  bench_smollm2   bench.py --preset smollm2 (bf16, 5 rounds), every method (lora, moelora, experiments/methods/): step,
                  memory, generation, FLOP ratio, efficiency, no target; one that cannot be built fails it on CUDA.
  nf4             a bitsandbytes nf4 base (QLoRA-style), 5 steps (CUDA only).
  fsdp_1gpu       --trainer.strategy=fsdp (FSDP1) on one GPU, 3 steps (CUDA only).
  grad_ckpt       non-reentrant gradient checkpointing: the same loss, gradients and queues as without.
Exit code 0 when no check failed (skipped ones do not fail).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SMOKE = str(REPO / "experiments" / "smoke.yaml")
TINY_BASE = str(REPO / "moelora_lit" / "assets" / "tiny-base")
sys.path.insert(0, str(REPO / "benchmarks"))
TARGETS = {"step_time_ratio_vs_peft_lora": 1.10, "peak_memory_ratio_vs_peft_lora": 1.05,
           "generate_time_ratio_vs_peft_lora": 1.10}
METHODS = ("peft_lora", "lora", "moelora", "loramoe", "hydralora", "mola", "flylora", "mixlora")
REPORTED = {"step": "step_time_ratio_vs_peft_lora", "mem": "peak_memory_ratio_vs_peft_lora",
            "gen": "generate_time_ratio_vs_peft_lora", "flops": "flop_ratio_vs_peft_lora",
            "eff": "efficiency_vs_peft_lora"}
SKIP = "skipped: needs CUDA"


class Skipped(Exception):
    """A check that cannot run on this device."""


def _fit(args: list[str], callbacks: list[Any] | None = None) -> list[float]:
    """``fit`` through the project's CLI in this process; returns the per-step training losses."""
    import lightning as L

    from moelora_lit.__main__ import MoELoRACLI
    from moelora_lit.data import ReasoningDataModule
    from moelora_lit.lightning.module import MoELoRAModule

    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    cli = MoELoRACLI(MoELoRAModule, ReasoningDataModule, args=["--config", SMOKE, *args], run=False,
                     save_config_kwargs={"overwrite": True})
    cli.trainer.callbacks.extend([Losses(), *(callbacks or [])])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if not losses or not all(torch.isfinite(torch.tensor(losses))):
        raise AssertionError(f"training losses not finite: {losses}")
    return losses


def _common(out: Path, device: str) -> list[str]:
    return ["--trainer.default_root_dir", str(out), "--trainer.accelerator", "gpu" if device == "cuda" else "cpu",
            "--trainer.devices", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1"]


def check_bf16_train(cuda: bool, out: Path) -> dict:
    import lightning as L

    from moelora_lit.models.gguf import SMOLLM2

    class SyncGuard(L.Callback):
        """Any host-device sync between the start of step ``step`` and its optimizer step raises."""

        def __init__(self, step: int) -> None:
            self.step, self.guarded = step, False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if cuda and trainer.global_step == self.step:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                self.guarded = True

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if self.guarded:
                torch.cuda.set_sync_debug_mode("default")

    guard = SyncGuard(step=3)
    steps = 20 if cuda else 2
    base = SMOLLM2 if cuda else TINY_BASE
    small = [] if cuda else ["--data.train=[{name: synth_add, limit: 8}]", "--data.batch_size=4",
                             "--data.max_length=64"]
    try:
        losses = _fit([*_common(out, "cuda" if cuda else "cpu"), "--model.base_model", base, "--trainer.max_steps",
                       str(steps), "--trainer.precision", "bf16-mixed", "--faults.check_finite", "false", *small],
                      [guard])
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    sync = "no host sync in step 3" if guard.guarded else "sync check skipped (CPU)"
    return {"status": "ok", "detail": f"{base.rsplit('/', 1)[-1]}, {len(losses)} steps, loss {losses[0]:.3f} -> "
            f"{losses[-1]:.3f}; {sync}", "losses": losses, "sync_checked": guard.guarded}


def check_bench(cuda: bool, out: Path, preset: str, variants: tuple[str, ...] = ()) -> dict:
    json_path = out / f"bench_{preset}.json"
    args = ["--preset", preset, "--device", "cuda", "--json", str(json_path)] if cuda else \
        ["--preset", "tiny", "--reps", "1", "--gen-reps", "1", "--json", str(json_path)]
    if variants:  # every method in one run; one that cannot be built is reported, not fatal to the others
        args += ["--variants", ",".join(variants), "--skip-unavailable"]
        args += ["--amp", "bf16", "--threads", "0", "--reps", "5", "--gen-reps", "2"] if cuda else \
            ["--warmup", "1", "--layers", "4"]          # MoLA's four depth groups need four blocks
    if cuda:  # a fresh process: its memory peaks are the benchmark's own
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise AssertionError(f"bench.py exited {done.returncode}: {done.stderr[-800:]}")
    else:  # in this process: the same code path without a second start-up
        import bench

        bench.main(args)
    result = json.loads(json_path.read_text())
    if variants:
        return family_summary(cuda, result)
    ratios = {k: result.get(k) for k in TARGETS}
    shown = ", ".join(f"{k.split('_')[0]} {v:.3f}" for k, v in ratios.items() if v is not None)
    if not cuda:
        return {"status": "ok", "detail": f"--preset tiny on CPU ran ({shown}; no target on CPU)", "ratios": ratios}
    missed = [k for k, v in ratios.items() if v is None or v > TARGETS[k]]
    status = "FAIL" if missed else "ok"
    return {"status": status, "detail": f"{shown}" + (f"; over target: {', '.join(missed)}" if missed else ""),
            "ratios": ratios, "targets": TARGETS, "device_name": result.get("device_name")}


def family_summary(cuda: bool, result: dict) -> dict:
    """Each method's ratios to PEFT LoRA; methods not measured fail the check on CUDA."""
    rows = {name: {short: row.get(key) for short, key in REPORTED.items()}
            for name, row in result["variants"].items() if name != "peft_lora"}
    missing = result.get("unavailable_variants", {})
    shown = "; ".join(f"{n} " + " ".join(f"{k} {v:.2f}" for k, v in r.items() if v is not None)
                      for n, r in rows.items())
    detail = shown + (f"; not measured: {', '.join(missing)}" if missing else "")
    return {"status": "FAIL" if cuda and missing else "ok", "detail": detail, "variants": rows,
            "not_measured": missing, "device_name": result.get("device_name")}


def check_nf4(cuda: bool, out: Path) -> dict:
    if not cuda:
        raise Skipped
    from moelora_lit.models.gguf import SMOLLM2

    losses = _fit([*_common(out, "cuda"), "--model.base_model", SMOLLM2, "--model.quantization", "nf4",
                   "--trainer.max_steps", "5", "--trainer.precision", "bf16-mixed"])
    return {"status": "ok", "detail": f"5 steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}", "losses": losses}


def check_fsdp(cuda: bool, out: Path) -> dict:
    if not cuda:
        raise Skipped
    cmd = [sys.executable, "-m", "moelora_lit", "fit", "--config", SMOKE, *_common(out, "cuda"),
           "--trainer.strategy", "fsdp", "--trainer.max_steps", "3", "--test_after_fit", "false"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}: {done.stderr[-800:]}")
    ckpts = list(out.glob("lightning_logs/*/checkpoints/last.ckpt"))
    step = torch.load(ckpts[0], weights_only=True)["global_step"] if ckpts else None
    if step != 3:
        raise AssertionError(f"expected last.ckpt at step 3, found {ckpts} (step {step})")
    return {"status": "ok", "detail": "3 steps on one GPU, last.ckpt at step 3"}


def check_grad_ckpt(cuda: bool, out: Path) -> dict:
    """As tests/test_training_conditions.py: two steps with and without checkpointing, all routers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moelora_lit import MoELoRAConfig, collect_aux_losses, inject_moelora, moelora_layers, push_queues
    from moelora_lit.inject import set_token_mask

    device = torch.device("cuda" if cuda else "cpu")
    hidden, layers, seq = (512, 4, 128) if cuda else (32, 1, 8)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * seq)

    def build(router: str, checkpointing: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device).train()
        inject_moelora(model, MoELoRAConfig(r=8, num_experts=4, top_k=2, router=router, lora_dropout=0.1,
                                            contrastive_weight=0.5, balance_weight=0.5, z_loss_weight=0.1,
                                            contrastive_queue_size=64))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, layer in moelora_layers(model):
                for name, param in layer.named_parameters():
                    if name.startswith(("lora_", "router")):
                        param.copy_((torch.randn(param.shape, generator=generator) * 0.1).to(device))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    def step(model: torch.nn.Module, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 256, (2, seq), generator=generator).to(device)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        set_token_mask(model, mask)
        torch.manual_seed(100 + seed)
        if cuda:
            torch.cuda.manual_seed(100 + seed)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss = loss + sum(collect_aux_losses(model).values())
        loss.backward()
        push_queues(model)
        return loss.detach()

    worst = 0.0
    for router in ("topk", "dense", "noisy", "random"):
        plain, ckpt = build(router, False), build(router, True)
        for seed in (0, 1):
            for m in (plain, ckpt):
                m.zero_grad()
            a, b = step(plain, seed), step(ckpt, seed)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
                if p.grad is not None:
                    torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
                    worst = max(worst, float((q.grad - p.grad).abs().max()))
            for (name, x), (_, y) in zip(plain.named_buffers(), ckpt.named_buffers(), strict=True):
                if "contrastive_queue" in name:
                    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5, msg=name)
    return {"status": "ok", "detail": f"4 routers x 2 steps, hidden {hidden}: loss, grads and queues equal "
            f"(max grad diff {worst:.1e})"}


def run_all(cuda: bool, out: Path) -> dict[str, dict]:
    checks = {
        "bf16_train": lambda d: check_bf16_train(cuda, d),
        "bench_default": lambda d: check_bench(cuda, d, "default"),
        "bench_7b_layer": lambda d: check_bench(cuda, d, "llama7b_layer") if cuda else _skip(),
        "bench_smollm2": lambda d: check_bench(cuda, d, "smollm2", METHODS),
        "nf4": lambda d: check_nf4(cuda, d),
        "grad_ckpt": lambda d: check_grad_ckpt(cuda, d),
        "fsdp_1gpu": lambda d: check_fsdp(cuda, d),
    }
    results = {}
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            result = check(out / name)
        except Skipped:
            result = {"status": SKIP, "detail": ""}
        except Exception as err:  # noqa: BLE001 - a failed check is reported, the others still run
            result = {"status": "FAIL", "detail": f"{type(err).__name__}: {str(err)[:300]}",
                      "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = result
        print(f"[{name}] {result['status']} ({result['seconds']} s)", flush=True)
    return results


def _skip() -> dict:
    raise Skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on CPU, each check scaled down")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="write the results here")
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the scaled-down checks")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not cuda:  # the compiled CPU contrastive kernel costs seconds of compilation per shape: not what --cpu checks
        os.environ.setdefault("MOELORA_COMPILE_CONTRASTIVE", "0")
    device = torch.device("cuda" if cuda else "cpu")
    from moelora_lit.machine import matmul_gflops

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(cuda, args.out or Path(tmp))
    info = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "matmul_gflops_float32": round(matmul_gflops(device=device), 1),
            "wall_s": round(time.perf_counter() - start, 1)}
    width = max(len(n) for n in results)
    lines = [f"{'check':<{width}}  {'status':<20}  {'s':>6}  detail", "-" * (width + 60)]
    lines += [f"{n:<{width}}  {r['status']:<20}  {r['seconds']:>6.1f}  {r['detail']}" for n, r in results.items()]
    print("\n".join(lines))
    print(f"device {info['device']}, torch {info['torch']}, {info['threads']} threads, float32 1024x1024 matmul "
          f"{info['matmul_gflops_float32']} GFLOPS, wall {info['wall_s']} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"info": info, "checks": results}, indent=2))
    print(f"wrote {args.json}")
    return 1 if any(r["status"] == "FAIL" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
