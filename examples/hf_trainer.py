"""MoELoRA with the Hugging Face Trainer: the embedded tiny base on the synthetic suite, then test accuracy.

    python examples/hf_trainer.py                 # about a minute on 2 CPU cores
    python examples/hf_trainer.py --steps 600     # the quickstart's step budget

Trains on ``synth_all`` (responses only in the loss, as the Lightning path), scores greedy generations of held-out
test problems with the library's answer rules and prints one accuracy per family. The adapter lands in
``<out>/adapter``; TensorBoard logs (``train/*``, ``routing/*``) under ``<out>/runs``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import PrinterCallback, TrainingArguments

import moelora_lit
from moelora_lit import MoELoRAConfig, inject_moelora
from moelora_lit.data.batching import Collator, encode_rows
from moelora_lit.data.prompts import build_prompt
from moelora_lit.data.synthetic import SYNTHETIC_TASKS, synthetic_rows
from moelora_lit.eval.answers import is_correct
from moelora_lit.integrations.transformers import MoELoRACallback, MoELoRATrainer
from moelora_lit.lightning.generation import generate_texts
from moelora_lit.models.loading import load_base_model, load_tokenizer

TINY_BASE = str(Path(moelora_lit.__file__).parent / "assets" / "tiny-base")
ADAPTER = MoELoRAConfig(r=32, num_experts=8, top_k=2, lora_alpha=32, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        contrastive_weight=0.01, contrastive_queue_size=128, balance_weight=0.01)


def token_rows(tokenizer, rows: list[dict[str, str]], max_length: int = 128) -> list[dict[str, list[int]]]:
    """Prompt + response ids with the prompt masked out of the labels (``moelora_lit.data.batching.encode_rows``)."""
    columns = {k: [r[k] for r in rows] for k in ("instruction", "input", "output")}
    encoded = encode_rows(columns, tokenizer, "alpaca", max_length, train_on_inputs=False, with_prompt=False)
    return [{"input_ids": i, "labels": lab} for i, lab in zip(encoded["input_ids"], encoded["labels"], strict=True)]


def test_accuracy(model, tokenizer, limit: int = 50, max_new_tokens: int = 32) -> dict[str, float]:
    """Greedy generations of each family's first ``limit`` test problems, scored by ``is_correct``."""
    model.eval()
    holder = SimpleNamespace(model=model, tokenizer=tokenizer)
    accuracy = {}
    for task in SYNTHETIC_TASKS:
        rows = synthetic_rows(task, "test", limit)
        prompts = tokenizer([build_prompt("alpaca", r["instruction"], r["input"]) for r in rows], padding=True,
                            return_tensors="pt")                             # left-padded (load_tokenizer)
        texts = generate_texts(holder, {"prompt_input_ids": prompts["input_ids"],
                                        "prompt_attention_mask": prompts["attention_mask"]}, max_new_tokens)
        accuracy[task] = sum(is_correct(task, t, r["answer"]) for t, r in zip(texts, rows, strict=True)) / len(rows)
    return accuracy


def parse_args(doc: str, out: str) -> argparse.Namespace:
    """``--steps``, ``--out`` and ``--test-limit``, shared by both examples."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=out)
    parser.add_argument("--test-limit", type=int, default=50)
    return parser.parse_args()


def train_and_report(trainer, tokenizer, out: str, test_limit: int, start: float) -> None:
    """Train, print the logged loss terms, save the adapter files and print test accuracy per family."""
    trainer.remove_callback(PrinterCallback)  # the per-layer routing metrics make long lines; summarised below
    trainer.train()
    for e in (e for e in trainer.state.log_history if "train/loss" in e):
        print(f"step {e['step']:4d}  " + "  ".join(f"{k[6:]} {e[k]:.4f}" for k in e if k.startswith("train/")))
    trainer.save_model(f"{out}/adapter")                                      # adapter files only
    trained = time.perf_counter() - start
    accuracy = test_accuracy(trainer.model, tokenizer, test_limit)
    for task, value in accuracy.items():
        print(f"{task:<14} {value:6.3f}  (n={test_limit})")
    print(f"{'mean':<14} {sum(accuracy.values()) / len(accuracy):6.3f}")
    print(f"train {trained:.1f} s, total {time.perf_counter() - start:.1f} s; adapter in {out}/adapter")


def main() -> None:
    cli = parse_args(__doc__, "runs/hf_trainer")
    start = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(TINY_BASE)
    model = load_base_model(TINY_BASE)
    inject_moelora(model, ADAPTER)
    train = token_rows(tokenizer, synthetic_rows("synth_all", "train", 16 * cli.steps))
    args = TrainingArguments(cli.out, use_cpu=True, max_steps=cli.steps, per_device_train_batch_size=16,
                             learning_rate=2e-3, weight_decay=0.0, lr_scheduler_type="cosine", max_grad_norm=1.0,
                             logging_steps=max(cli.steps // 5, 1), save_strategy="no", report_to="tensorboard",
                             disable_tqdm=True, seed=0)
    trainer = MoELoRATrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                             data_collator=Collator(tokenizer.pad_token_id, eval_mode=False),
                             callbacks=[MoELoRACallback()])
    train_and_report(trainer, tokenizer, cli.out, cli.test_limit, start)


if __name__ == "__main__":
    main()
