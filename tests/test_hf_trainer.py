"""MoELoRA in the Hugging Face Trainer and TRL's SFTTrainer: loss, queues, logging, files, and equality with the
Lightning path (moelora_lit.integrations.transformers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import adapter_config, tiny_llama, token_batch
from safetensors.torch import load_file
from transformers import TrainingArguments

import moelora_lit
from moelora_lit import adapter_state_dict, inject_moelora, load_adapter, moelora_layers, save_adapter
from moelora_lit.data.batching import Collator, encode_rows
from moelora_lit.data.synthetic import synthetic_rows
from moelora_lit.integrations import mixin as integration
from moelora_lit.integrations.transformers import MoELoRACallback, MoELoRATrainer
from moelora_lit.models.loading import load_base_model, load_tokenizer

TINY_BASE = str(Path(moelora_lit.__file__).parent / "assets" / "tiny-base")


def token_rows(n: int = 12, seq: int = 10) -> list[dict[str, list[int]]]:
    """``n`` rows of random tokens for the tiny random Llama (the last two positions padded in odd rows)."""
    rows = []
    for i in range(n):
        b = token_batch(batch=2, seq=seq, seed=i, pad=2 * (i % 2))
        ids, mask = b["input_ids"][1], b["attention_mask"][1].bool()
        rows.append({"input_ids": ids[mask].tolist(), "labels": b["labels"][1][mask].tolist()})
    return rows


def training_args(out: Path, **overrides) -> TrainingArguments:
    values = dict(use_cpu=True, max_steps=3, per_device_train_batch_size=2, logging_steps=1, save_strategy="no",
                  report_to="none", disable_tqdm=True, learning_rate=1e-3, lr_scheduler_type="constant",
                  weight_decay=0.0, max_grad_norm=0.0, train_sampling_strategy="sequential", seed=0)
    return TrainingArguments(str(out), **{**values, **overrides})


def injected_llama(**config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_llama()
    inject_moelora(model, adapter_config(**config))
    return model


def train_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "train/loss" in e]


def test_import_does_not_load_lightning():
    code = ("import sys; from moelora_lit.integrations.transformers import MoELoRATrainer, MoELoRASFTTrainer, "
            "MoELoRACallback; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning', 'lightning_fabric')); print(bad); assert not bad")
    env = {**os.environ, "PYTHONPATH": str(Path(moelora_lit.__file__).parent.parent)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_model_without_moelora_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="inject_moelora"):
        MoELoRATrainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=token_rows(),
                       data_collator=Collator(0, eval_mode=False))


def test_train_logs_terms_fills_queues_and_saves_adapter_only(tmp_path):
    model = injected_llama()
    trainer = MoELoRATrainer(model=model, args=training_args(tmp_path, save_strategy="steps", save_steps=3),
                             train_dataset=token_rows(), data_collator=Collator(0, eval_mode=False),
                             callbacks=[MoELoRACallback()])
    trainer.train()
    logs = train_logs(trainer)
    assert [e["step"] for e in logs] == [1, 2, 3]
    assert logs[-1]["train/contrastive_loss"] > 0  # the queues held anchors of earlier steps
    for e in logs:  # the logged terms add up to the loss the Trainer optimised and logged
        terms = sum(e[f"train/{k}"] for k in ("task_loss", "contrastive_loss", "balance_loss", "z_loss"))
        assert e["train/loss"] == pytest.approx(terms) == pytest.approx(e["loss"], rel=1e-5)
        for name, _ in moelora_layers(model):
            assert 0 < e[f"routing/entropy/{name}"] <= 1.3863  # log(4): 4 experts
            assert e[f"routing/max_load/{name}"] >= 0.25 >= e[f"routing/min_load/{name}"]
    assert all(int(layer.contrastive_queue_count.sum()) > 0 for _, layer in moelora_layers(model))

    folder = tmp_path / "checkpoint-3"
    files = set(os.listdir(folder))
    assert {"adapter.safetensors", "adapter_config.json", "moelora_queues.safetensors"} <= files
    assert not {f for f in files if f.startswith(("model", "pytorch_model"))}
    saved = load_file(folder / "adapter.safetensors")
    assert saved and all(k.rsplit(".", 2)[-2].startswith(("lora_", "router")) for k in saved)  # no base weight
    fresh = load_adapter(tiny_llama(), folder)
    for key, value in adapter_state_dict(model).items():
        torch.testing.assert_close(adapter_state_dict(fresh)[key], value, rtol=0, atol=0)


def test_resume_restores_adapter_and_queues(tmp_path):
    args = training_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    first = injected_llama()
    MoELoRATrainer(model=first, args=args, train_dataset=token_rows(), data_collator=Collator(0, False)).train()
    resumed = injected_llama()
    trainer = MoELoRATrainer(model=resumed, args=args, train_dataset=token_rows(), data_collator=Collator(0, False))
    trainer._load_from_checkpoint(str(tmp_path / "checkpoint-2"))
    for key, value in adapter_state_dict(first, include_queues=True).items():
        torch.testing.assert_close(adapter_state_dict(resumed, include_queues=True)[key], value, rtol=0, atol=0)


def test_accumulation_pushes_each_micro_batch_once(tmp_path, monkeypatch):
    calls = []
    push = integration.after_backward
    monkeypatch.setattr(integration, "after_backward", lambda model, **kw: (calls.append(1), push(model, **kw)))
    model = injected_llama(contrastive_queue_size=4096)   # large enough that nothing is overwritten
    rows = token_rows(8)
    trainer = MoELoRATrainer(model=model, args=training_args(tmp_path, max_steps=2, gradient_accumulation_steps=2),
                             train_dataset=rows, data_collator=Collator(0, eval_mode=False))
    trainer.train()
    assert len(calls) == 4                                  # 2 optimizer steps x 2 micro-batches
    real_tokens = sum(len(r["input_ids"]) for r in rows)    # every row once, in order
    for _, layer in moelora_layers(model):
        assert layer.pending is None
        assert int(layer.contrastive_queue_count.sum()) == real_tokens * layer.config.top_k
    for e in train_logs(trainer):  # the terms' scaling for accumulation is the Trainer's own
        assert e["train/loss"] == pytest.approx(e["loss"], rel=1e-5)


def test_gradient_checkpointing_exact_and_reentrant_refused(tmp_path):
    def run(**overrides):
        trainer = MoELoRATrainer(model=injected_llama(), args=training_args(tmp_path, max_steps=2, **overrides),
                                 train_dataset=token_rows(), data_collator=Collator(0, eval_mode=False))
        trainer.train()
        return train_logs(trainer), adapter_state_dict(trainer.model)

    plain, plain_adapter = run()
    checkpointed, ckpt_adapter = run(gradient_checkpointing=True)
    for a, b in zip(plain, checkpointed, strict=True):
        for key in ("train/task_loss", "train/contrastive_loss", "train/balance_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7)
    for key, value in plain_adapter.items():
        torch.testing.assert_close(ckpt_adapter[key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="use_reentrant"):
        run(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})


def synthetic_token_rows(tokenizer, n: int) -> list[dict[str, list[int]]]:
    rows = synthetic_rows("synth_all", "train", n)
    encoded = encode_rows({k: [r[k] for r in rows] for k in ("instruction", "input", "output")}, tokenizer,
                          "alpaca", 96, train_on_inputs=False, with_prompt=False)
    return [{"input_ids": i, "labels": lab} for i, lab in zip(encoded["input_ids"], encoded["labels"], strict=True)]


@pytest.mark.slow
def test_equals_lightning_path_step_for_step(tmp_path):
    """Same base, initial adapter, batches, AdamW and 5 steps: same loss terms per step, same adapter at the end."""
    import lightning as L
    from torch.utils.data import DataLoader

    from moelora_lit.lightning.module import MoELoRAModule

    config = adapter_config(r=16, contrastive_queue_size=32, z_loss_weight=0.01)
    tokenizer = load_tokenizer(TINY_BASE)
    rows = synthetic_token_rows(tokenizer, 20)
    collator = Collator(tokenizer.pad_token_id, eval_mode=False)

    torch.manual_seed(0)
    model = load_base_model(TINY_BASE)
    inject_moelora(model, config)
    save_adapter(model, tmp_path / "init")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    args = training_args(tmp_path / "hf", max_steps=5, per_device_train_batch_size=4)
    trainer = MoELoRATrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                             optimizers=(optimizer, None))
    trainer.train()
    hf = train_logs(trainer)

    class Record(L.Callback):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    module = MoELoRAModule(base_model=TINY_BASE, adapter=config, init_adapter=str(tmp_path / "init"),
                           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0),
                           generate_on_validation=False)
    record = Record()
    L.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              default_root_dir=str(tmp_path / "lit"), callbacks=[record]).fit(
        module, DataLoader(rows, batch_size=4, shuffle=False, collate_fn=collator))

    assert len(hf) == len(record.steps) == 5
    assert record.steps[-1]["train/contrastive_loss"] > 0 and record.steps[-1]["train/z_loss"] > 0
    for step, (a, b) in enumerate(zip(hf, record.steps, strict=True)):
        for key in ("train/loss", "train/task_loss", "train/contrastive_loss", "train/balance_loss", "train/z_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (step, key)
    lit_adapter = adapter_state_dict(module.model, include_queues=True)
    for key, value in adapter_state_dict(model, include_queues=True).items():
        torch.testing.assert_close(value, lit_adapter[key], rtol=0, atol=1e-5)


def test_nf4_quantised_base_trains(tmp_path):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = load_base_model(TINY_BASE, quantization="nf4")
    inject_moelora(model, adapter_config(r=16))
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    tokenizer = load_tokenizer(TINY_BASE)
    trainer = MoELoRATrainer(model=model, args=training_args(tmp_path, max_steps=2),
                             train_dataset=synthetic_token_rows(tokenizer, 4),
                             data_collator=Collator(tokenizer.pad_token_id, eval_mode=False))
    trainer.train()
    logs = train_logs(trainer)
    assert all(torch.isfinite(torch.tensor(e["train/loss"])) for e in logs) and logs[-1]["train/balance_loss"] > 0
    assert type(next(moelora_layers(model))[1].base_layer).__name__ == "Linear4bit"
    assert any(not torch.equal(before[k], v) for k, v in adapter_state_dict(model).items())


def test_sft_trainer_completion_only(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from moelora_lit.data.prompts import build_prompt
    from moelora_lit.integrations.transformers import MoELoRASFTTrainer

    torch.manual_seed(0)
    model = load_base_model(TINY_BASE)
    inject_moelora(model, adapter_config(r=16))
    rows = synthetic_rows("synth_all", "train", 8)
    data = Dataset.from_list([{"prompt": build_prompt("alpaca", r["instruction"]), "completion": r["output"]}
                              for r in rows])
    args = SFTConfig(str(tmp_path), use_cpu=True, max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                     save_strategy="steps", save_steps=2, report_to="none", disable_tqdm=True, max_length=128)
    trainer = MoELoRASFTTrainer(model=model, args=args, train_dataset=data, processing_class=load_tokenizer(TINY_BASE))
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 2 and logs[-1]["train/contrastive_loss"] > 0
    assert logs[-1]["train/loss"] == pytest.approx(logs[-1]["loss"], rel=1e-5)
    files = set(os.listdir(tmp_path / "checkpoint-2"))
    assert "adapter.safetensors" in files and not {f for f in files if f.startswith(("model", "pytorch_model"))}
