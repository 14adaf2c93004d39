"""Base-model memory and MoELoRA step time of SmolLM2-135M-Instruct: float32 vs bf16 vs nf4 (vs int8).

    python experiments/studies/smollm2_arc_easy/memory.py --out experiments/studies/smollm2_arc_easy/results/memory.json

Memory is the frozen base's parameters and buffers (:func:`moelora_lit.models.quantization.base_memory_bytes`; adapters
excluded), measured, not estimated. Step time: forward + backward + AdamW on a real-text batch with MoELoRA
(r=32, 8 experts, top-2) on all seven projections, median of ``--steps`` after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from moelora_lit import MoELoRAConfig, inject_moelora
from moelora_lit.models.gguf import SMOLLM2, resolve_gguf
from moelora_lit.models.loading import load_base_model, load_tokenizer
from moelora_lit.models.quantization import base_memory_bytes

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = ("Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
        "glucose and oxygen. It takes place mainly in the leaves, inside the chloroplasts. ") * 4


def measure(variant: str, batch: int, length: int, steps: int) -> dict:
    folder, name = resolve_gguf(SMOLLM2)
    dtype, quantization = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"),
                           "nf4": ("float32", "nf4"), "int8": ("float32", "int8")}[variant]
    start = time.perf_counter()
    model = load_base_model(folder, torch_dtype=dtype, gguf_file=name, quantization=quantization)
    load_s = time.perf_counter() - start
    memory = base_memory_bytes(model)
    tok = load_tokenizer(folder, gguf_file=name)
    ids = tok([TEXT] * batch, return_tensors="pt", truncation=True, max_length=length).input_ids
    inject_moelora(model, MoELoRAConfig(r=32, num_experts=8, top_k=2, lora_alpha=32, lora_dropout=0.0,
                                        target_modules=SEVEN))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t)
    return {"variant": variant, "base_memory_mb": round(memory / 2**20, 1), "load_s": round(load_s, 1),
            "trainable_params": sum(p.numel() for p in params), "tokens": list(ids.shape),
            "step_s_median": round(statistics.median(times[1:]), 2) if steps else None,
            "step_s": [round(x, 2) for x in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["float32", "bfloat16", "nf4"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for variant in args.variants:
        rows.append(measure(variant, args.batch, args.length, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    report = {"rows": rows, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
              "command": "python experiments/studies/smollm2_arc_easy/memory.py " + " ".join(
                  f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
                  if v is not None)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
