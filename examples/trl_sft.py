"""MoELoRA with TRL's SFTTrainer: the embedded tiny base on the synthetic suite, then test accuracy.

    python examples/trl_sft.py                    # about a minute on 2 CPU cores

The same run as ``examples/hf_trainer.py``, with TRL preparing the data: prompt / completion pairs, the loss on
the completion only. Test accuracy comes from the library's answer rules on greedy generations.
"""

from __future__ import annotations

import argparse
import time

import torch
from datasets import Dataset
from hf_trainer import ADAPTER, TINY_BASE, test_accuracy
from transformers import PrinterCallback
from trl import SFTConfig

from moelora_lit import inject_moelora
from moelora_lit.data.prompts import build_prompt
from moelora_lit.data.synthetic import synthetic_rows
from moelora_lit.integrations.transformers import MoELoRACallback, MoELoRASFTTrainer
from moelora_lit.models.loading import load_base_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/trl_sft")
    parser.add_argument("--test-limit", type=int, default=50)
    cli = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(TINY_BASE)
    model = load_base_model(TINY_BASE)
    inject_moelora(model, ADAPTER)
    rows = synthetic_rows("synth_all", "train", 16 * cli.steps)
    train = Dataset.from_list([{"prompt": build_prompt("alpaca", r["instruction"], r["input"]),
                                "completion": r["output"] + tokenizer.eos_token} for r in rows])
    args = SFTConfig(cli.out, use_cpu=True, max_steps=cli.steps, per_device_train_batch_size=16, learning_rate=2e-3,
                     weight_decay=0.0, lr_scheduler_type="cosine", max_grad_norm=1.0, max_length=128,
                     logging_steps=max(cli.steps // 5, 1), save_strategy="no", report_to="tensorboard",
                     disable_tqdm=True, seed=0)
    trainer = MoELoRASFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                                callbacks=[MoELoRACallback()])
    trainer.remove_callback(PrinterCallback)  # the per-layer routing metrics make long lines; summarised below
    trainer.train()
    for e in (e for e in trainer.state.log_history if "train/loss" in e):
        print(f"step {e['step']:4d}  " + "  ".join(f"{k[6:]} {e[k]:.4f}" for k in e if k.startswith("train/")))
    trainer.save_model(f"{cli.out}/adapter")                                  # adapter files only
    trained = time.perf_counter() - start
    accuracy = test_accuracy(model, tokenizer, cli.test_limit)
    for task, value in accuracy.items():
        print(f"{task:<14} {value:6.3f}  (n={cli.test_limit})")
    print(f"{'mean':<14} {sum(accuracy.values()) / len(accuracy):6.3f}")
    print(f"train {trained:.1f} s, total {time.perf_counter() - start:.1f} s; adapter in {cli.out}/adapter")


if __name__ == "__main__":
    main()
