"""MoELoRA with TRL's SFTTrainer: the embedded tiny base on the synthetic suite, then test accuracy.

    python examples/trl_sft.py                    # about a minute on 2 CPU cores

The same run as ``examples/hf_trainer.py``, with TRL preparing the data: prompt / completion pairs, the loss on
the completion only. Test accuracy comes from the library's answer rules on greedy generations.
"""

from __future__ import annotations

import time

import torch
from datasets import Dataset
from hf_trainer import ADAPTER, TINY_BASE, parse_args, train_and_report
from trl import SFTConfig

from moelora_lit import inject_moelora
from moelora_lit.data.prompts import build_prompt
from moelora_lit.data.synthetic import synthetic_rows
from moelora_lit.integrations.transformers import MoELoRACallback, MoELoRASFTTrainer
from moelora_lit.models.loading import load_base_model, load_tokenizer


def main() -> None:
    cli = parse_args(__doc__, "runs/trl_sft")
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
    train_and_report(trainer, tokenizer, cli.out, cli.test_limit, start)


if __name__ == "__main__":
    main()
