"""Measurement helpers: models and batch, one training step, round-robin timing, peak memory, generation."""

from __future__ import annotations

import copy
import gc
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

try:  # an installed package or PYTHONPATH wins; otherwise run from this checkout without installing
    import moelora_lit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from presets import FAMILY, Sizes, method_adapter  # noqa: E402

from moelora_lit import MoELoRAConfig, collect_aux_losses, inject_moelora, push_queues, set_token_mask  # noqa: E402

MB = 1024 * 1024


# --------------------------------------------------------------------------------------------- statistics
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


# --------------------------------------------------------------------------------------------- models
def build_base(s: Sizes, device: torch.device) -> nn.Module:
    """A randomly initialised (seeded) frozen ``LlamaForCausalLM`` of shape ``s``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        max_position_embeddings=max(s.seq, s.gen_prompt + s.gen_new_tokens) + 8,
        tie_word_embeddings=s.tie_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_theta=s.rope_theta, rms_norm_eps=s.rms_eps,
    )
    torch.manual_seed(s.seed)
    model = LlamaForCausalLM(config).to(device)
    model.generation_config.pad_token_id = 0
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def make_variant(name: str, base: nn.Module, s: Sizes) -> nn.Module:
    """A copy of ``base`` with variant ``name``'s adapter (see presets.DESCRIPTIONS)."""
    # share_base: the copy reuses the base's frozen parameters (same values, no extra RAM).
    memo = {id(p): p for p in base.parameters()} if s.share_base else None
    model = copy.deepcopy(base, memo)
    torch.manual_seed(s.seed + 1)
    if name == "base":
        # Nothing is trainable: make the embeddings' output require grad so backward runs through the model.
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        return model
    if name == "peft_lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.targets),
                         bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)
    if name in FAMILY:  # the method's own preset (experiments/methods/<name>.yaml), not this benchmark's sizes
        inject_moelora(model, MoELoRAConfig.from_dict(method_adapter(name, s.targets)))
        return model
    lora = name == "lora"
    cfg = MoELoRAConfig(
        r=s.rank, num_experts=1 if lora else s.experts, top_k=1 if lora else s.top_k, lora_alpha=s.alpha,
        lora_dropout=s.dropout, target_modules=list(s.targets), router="dense" if name == "moelora_dense" else "topk",
        contrastive_weight=0.0 if name in ("moelora_no_cl", "lora") else s.contrastive_weight,
        contrastive_queue_size=s.queue, balance_weight=0.0 if lora else s.balance_weight,
        aux_reduction=s.aux_reduction,
    )
    inject_moelora(model, cfg)
    return model


@dataclass
class Variant:
    """A model under test, its optimizer and what was measured on it."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    moelora: bool
    step_ms: list[float] = field(default_factory=list)
    step_cpu_ms: list[float] = field(default_factory=list)
    gen_ms: list[float] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    flops: dict = field(default_factory=dict)  # benchmarks/arithmetic.variant_flops
    first_step_ms: float | None = None  # includes one-time work: compiling the CPU contrastive kernel, AdamW state

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def build_variants(names: list[str], s: Sizes, device: torch.device,
                   unavailable: dict[str, str] | None = None) -> list[Variant]:
    """One ``Variant`` per name, all from the same base weights, each with AdamW over its trainable params.

    With an ``unavailable`` dict, a variant that cannot be built (a missing method preset, a config the package does
    not accept yet) is left out and its error recorded there; without one, the error propagates.
    """
    base = build_base(s, device)
    variants = []
    for name in names:
        try:
            model = make_variant(name, base, s).train()
        except (FileNotFoundError, ValueError, TypeError, KeyError) as err:
            if unavailable is None:
                raise
            unavailable[name] = f"{type(err).__name__}: {err}"
            continue
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=s.lr) if params else None
        variants.append(Variant(name, model, optimizer, moelora=name not in ("base", "peft_lora")))
    return variants


def make_batch(s: Sizes, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens with some right padding (rows lose 0, 1/16, 2/16... of the sequence)."""
    g = torch.Generator().manual_seed(s.seed + 2)
    input_ids = torch.randint(3, s.vocab, (s.batch, s.seq), generator=g)
    attention_mask = torch.ones(s.batch, s.seq, dtype=torch.long)
    for b in range(s.batch):
        pad = ((b % 16) * s.seq) // 16
        if pad:
            attention_mask[b, s.seq - pad:] = 0
            input_ids[b, s.seq - pad:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    prompts = torch.randint(3, s.vocab, (s.gen_batch, s.gen_prompt), generator=g)
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                                prompts=prompts).items()}


# --------------------------------------------------------------------------------------------- steps
def train_step(v: Variant, batch: dict[str, torch.Tensor], amp: torch.dtype | None) -> torch.Tensor:
    """forward + loss (+ MoELoRA's auxiliary terms) + backward (+ the queue push, as ``MoELoRAModule`` does after
    backward) + AdamW step + zero_grad; returns the loss."""
    device = batch["input_ids"].device
    with torch.autocast(device_type=device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        if v.moelora:
            set_token_mask(v.model, batch["attention_mask"])
        out = v.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"], use_cache=False)
        loss = out.loss
        if v.moelora:
            loss = loss + sum(collect_aux_losses(v.model).values())
    loss.backward()
    if v.moelora:
        push_queues(v.model)
    if v.optimizer is not None:
        v.optimizer.step()
        v.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def generate(v: Variant, batch: dict[str, torch.Tensor], s: Sizes, amp: torch.dtype | None) -> torch.Tensor:
    """Greedy generation of exactly ``s.gen_new_tokens`` tokens from the batch's prompts."""
    prompts = batch["prompts"]
    with torch.no_grad(), torch.autocast(device_type=prompts.device.type, dtype=amp or torch.bfloat16,
                                         enabled=amp is not None):
        return v.model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                max_new_tokens=s.gen_new_tokens, min_new_tokens=s.gen_new_tokens,
                                do_sample=False, use_cache=True, pad_token_id=0)


def load_1min() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def time_steps(variants: list[Variant], batch: dict[str, torch.Tensor], s: Sizes,
               amp: torch.dtype | None) -> list[float | None]:
    """``s.warmup`` steps per variant, then ``s.reps`` rounds of one step each, the order rotating every round.

    Interleaving one step of every variant per round (A B C, B C A, ...) makes a slow phase of a shared machine hit
    every variant of that round alike, so each round's own ratio (the ``paired`` ratios) is steadier than a ratio of
    medians. Each step records wall time and the process's CPU time (``time.process_time``: what this process ran,
    not what it waited for a core). Returns the 1-minute load average before each round.
    """
    device = batch["input_ids"].device
    for v in variants:  # also fills the contrastive queues, creates AdamW's state and compiles kernels
        for i in range(s.warmup):
            t0 = time.perf_counter()
            train_step(v, batch, amp)
            if i == 0:
                sync(device)
                v.first_step_ms = (time.perf_counter() - t0) * 1e3
    sync(device)
    loads = []
    for rep in range(s.reps):
        loads.append(load_1min())
        k = rep % len(variants)
        for v in variants[k:] + variants[:k]:
            gc.collect()
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            loss = train_step(v, batch, amp)
            sync(device)
            v.step_ms.append((time.perf_counter() - t0) * 1e3)
            v.step_cpu_ms.append((time.process_time() - c0) * 1e3)
            if not math.isfinite(float(loss)):
                raise RuntimeError(f"{v.name} produced a non-finite loss")
    return loads


def time_generation(variants: list[Variant], batch: dict[str, torch.Tensor], s: Sizes,
                    amp: torch.dtype | None) -> dict[str, int]:
    """Round-robin ``generate`` timing (eval mode) after ``s.gen_warmup`` calls; returns new tokens per variant."""
    device = batch["input_ids"].device
    new_tokens = {}
    for v in variants:
        v.model.eval()
        for _ in range(s.gen_warmup):
            out = generate(v, batch, s, amp)
        new_tokens[v.name] = int(out.shape[1] - s.gen_prompt)
    for rep in range(s.gen_reps):
        k = rep % max(len(variants), 1)
        for v in variants[k:] + variants[:k]:
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            generate(v, batch, s, amp)
            sync(device)
            v.gen_ms.append((time.perf_counter() - t0) * 1e3)
    return new_tokens
