"""MoELoRA with the Hugging Face Trainer: the quickstart's job (experiments/quickstart.yaml) on the Trainer.

    python examples/hf_trainer.py                 # the quickstart's adapter, data, lr schedule and 600 steps
    python examples/hf_trainer.py --steps 60      # a short run, to see it work

The adapter, the training rows (``synth_all``, the config's limit), the batch size, the lr with its cosine decay to 0,
gradient clipping, the step budget, the test sets and the generation budget are read from the quickstart config, so
the two trainers show the same result on the same job (responses only in the loss, as the Lightning path). Greedy
generations of held-out test problems are scored with the library's answer rules, one accuracy per family. The
adapter lands in ``<out>/adapter``; TensorBoard logs (``train/*``, ``routing/*``) under ``<out>/runs``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
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
QUICKSTART = yaml.safe_load((Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml").read_text())
ADAPTER = MoELoRAConfig(**QUICKSTART["model"]["adapter"])
OPTIMIZER = QUICKSTART["model"]["optimizer"]["init_args"]            # lr, weight decay (AdamW)
TRAIN = QUICKSTART["data"]["train"][0]                               # synth_all and its row limit
STEPS = QUICKSTART["trainer"]["max_steps"]
TEST_LIMIT = QUICKSTART["data"]["test"][0]["limit"]


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
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", default=out)
    parser.add_argument("--test-limit", type=int, default=TEST_LIMIT)
    return parser.parse_args()


def train_and_report(trainer, tokenizer, out: str, test_limit: int, start: float) -> None:
    """Train, print the logged loss terms, save the adapter files and print test accuracy per family."""
    trainer.remove_callback(PrinterCallback)  # the per-layer routing metrics make long lines; summarised below
    trainer.train()
    for e in (e for e in trainer.state.log_history if "train/loss" in e):
        print(f"step {e['step']:4d}  " + "  ".join(f"{k[6:]} {e[k]:.4f}" for k in e if k.startswith("train/")))
    trainer.save_model(f"{out}/adapter")                                      # adapter files only
    trained = time.perf_counter() - start
    accuracy = test_accuracy(trainer.model, tokenizer, test_limit, QUICKSTART["model"]["max_new_tokens"])
    for task, value in accuracy.items():
        print(f"{task:<14} {value:6.3f}  (n={test_limit})")
    print(f"{'mean':<14} {sum(accuracy.values()) / len(accuracy):6.3f}")
    print(f"train {trained:.1f} s, total {time.perf_counter() - start:.1f} s; adapter in {out}/adapter")


def training_settings(steps: int) -> dict:
    """The quickstart's optimisation as ``TrainingArguments``: AdamW at its lr and weight decay, cosine decay to 0
    over the run without warmup (``CosineAnnealingLR(T_max=max_steps)``), its gradient clipping and batch size."""
    return {"per_device_train_batch_size": QUICKSTART["data"]["batch_size"], "learning_rate": OPTIMIZER["lr"],
            "weight_decay": OPTIMIZER.get("weight_decay", 0.0), "lr_scheduler_type": "cosine", "warmup_steps": 0,
            "max_grad_norm": QUICKSTART["trainer"]["gradient_clip_val"], "logging_steps": max(steps // 5, 1),
            "save_strategy": "no", "report_to": "tensorboard", "disable_tqdm": True, "seed": 0}


def main() -> None:
    cli = parse_args(__doc__, "runs/hf_trainer")
    start = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(TINY_BASE)
    model = load_base_model(TINY_BASE)
    inject_moelora(model, ADAPTER)
    train = token_rows(tokenizer, synthetic_rows(TRAIN["name"], "train", TRAIN["limit"]),
                       QUICKSTART["data"]["max_length"])
    args = TrainingArguments(cli.out, use_cpu=True, max_steps=cli.steps, **training_settings(cli.steps))
    trainer = MoELoRATrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                             data_collator=Collator(tokenizer.pad_token_id, eval_mode=False),
                             callbacks=[MoELoRACallback()])
    train_and_report(trainer, tokenizer, cli.out, cli.test_limit, start)


if __name__ == "__main__":
    main()
