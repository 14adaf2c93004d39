"""MoELoRA with TRL's SFTTrainer: the quickstart's job (experiments/quickstart.yaml), then test accuracy.

    python examples/trl_sft.py                    # the quickstart's adapter, data, schedule and 600 steps
    python examples/trl_sft.py --steps 60         # a short run

The same run as ``examples/hf_trainer.py``, with TRL preparing the data: prompt / completion pairs, the loss on
the completion only. Test accuracy comes from the library's answer rules on greedy generations.
"""

from __future__ import annotations

import time

import torch
from datasets import Dataset
from hf_trainer import ADAPTER, QUICKSTART, TINY_BASE, TRAIN, parse_args, train_and_report, training_settings
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
    rows = synthetic_rows(TRAIN["name"], "train", TRAIN["limit"])
    train = Dataset.from_list([{"prompt": build_prompt("alpaca", r["instruction"], r["input"]),
                                "completion": r["output"] + tokenizer.eos_token} for r in rows])
    args = SFTConfig(cli.out, use_cpu=True, max_steps=cli.steps, max_length=QUICKSTART["data"]["max_length"],
                     **training_settings(cli.steps))
    trainer = MoELoRASFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                                callbacks=[MoELoRACallback()])
    train_and_report(trainer, tokenizer, cli.out, cli.test_limit, start)


if __name__ == "__main__":
    main()
