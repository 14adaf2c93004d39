"""The LightningModule: base model + MoELoRA, the total loss of docs/design.md §1.5, evaluation by generation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import SumMetric

from moelora_lit.adapter_io import (
    adapter_state_dict,
    is_queue_tensor,
    load_adapter,
    load_adapter_state_dict,
    read_adapter_config,
    save_adapter,
)
from moelora_lit.adapters import adapters_of
from moelora_lit.config import MoELoRAConfig
from moelora_lit.data.batching import eval_column
from moelora_lit.eval.answers import PROTOCOLS
from moelora_lit.inject import inject_moelora, matches, set_token_mask
from moelora_lit.lightning import evaluation
from moelora_lit.lightning.generation import generate_texts
from moelora_lit.lightning.sharding import checkpoint_state_dict, full_adapter_tensors, shard_model
from moelora_lit.models.loading import (
    DEFAULT_BASE,
    build_meta_model,
    check_dtype,
    load_base_model,
    load_tokenizer,
    resolve_base,
)
from moelora_lit.models.quantization import check_quantization
from moelora_lit.training_step import after_backward, step_loss


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-4)


class MoELoRAModule(L.LightningModule):
    """Fine-tunes a causal LM with MoELoRA adapters (Luo et al., 2024) and evaluates by generation.

    The base model is built lazily in :meth:`configure_model` (after the data has been validated and
    tokenised, and inside the strategy's context for FSDP/DeepSpeed); ``__init__`` only checks that the
    base model can be found and that ``adapter.target_modules`` match, on a meta-device copy.

    Args:
        base_model: hub id or local Hugging Face folder (also the tokenizer's source).
        adapter: the MoELoRA configuration (``model.adapter.*`` on the command line).
        model_config: optional inline HF config (``{"model_type": "llama", ...}``) to build a randomly
            initialised base of that architecture instead of loading weights (architecture studies).
        torch_dtype: dtype of the frozen base (``float32``, ``bfloat16``, ``float16`` or ``auto``).
        trust_remote_code: allow the base model's own Python code from the hub to run (off by default:
            turning it on executes code downloaded with the model).
        gradient_checkpointing: recompute activations in backward to save memory.
        init_adapter: an adapter folder (from :func:`save_adapter`) to start from or evaluate.
        optimizer: optimizer factory (``model.optimizer`` in the config).
        lr_scheduler: optional LR scheduler factory, stepped every optimizer step.
        max_new_tokens: generation budget for validation/test/predict.
        generate_on_validation: also compute ``val/acc/<dataset>`` by generation (else loss only).
        answer_protocol: how generations are scored: ``explicit`` (the stated answer first) or ``llm_adapters``
            (LLM-Adapters' ``evaluate.py`` rules exactly; see :mod:`moelora_lit.eval.answers`).
        num_beams: 1 for greedy decoding; LLM-Adapters evaluates with 4 beams.
        gguf_file: a GGUF file inside the folder ``base_model`` (``base_model`` may also be a ``.gguf`` path
            or ``package:<pkg>/<file>``, e.g. ``moelora_lit.models.gguf.SMOLLM2``; see :mod:`moelora_lit.models.gguf`).
        quantization: ``none``, ``nf4`` or ``int8``: a bitsandbytes-quantised frozen base (QLoRA-style);
            adapters and routers stay float32 (:mod:`moelora_lit.models.quantization`).
        scoring: ``generate`` (answers generated and extracted) or ``loglikelihood`` (multiple-choice sets scored
            by option log-likelihood, ``acc`` and ``acc_norm`` as lm-evaluation-harness; math sets still generate).
        loglik_prompt: ``harness`` (the harness's zero-shot templates) or ``training`` (the trained prompt and
            response); unset: ``training`` when an adapter was trained or loaded, else ``harness``.
        loglik_batch_sequences: option sequences per forward in loglikelihood scoring (whole questions).
    """

    def __init__(
        self,
        base_model: str = DEFAULT_BASE,
        adapter: MoELoRAConfig | None = None,
        model_config: dict[str, Any] | None = None,
        torch_dtype: str = "float32",
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        init_adapter: str | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_new_tokens: int = 256,
        generate_on_validation: bool = True,
        answer_protocol: str = "explicit",
        num_beams: int = 1,
        gguf_file: str | None = None,
        quantization: str = "none",
        scoring: str = "generate",
        loglik_prompt: str | None = None,
        loglik_batch_sequences: int = 64,
    ) -> None:
        super().__init__()
        check_dtype(torch_dtype)
        if answer_protocol not in PROTOCOLS:
            raise ValueError(f"model.answer_protocol={answer_protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"model.num_beams must be an integer >= 1, got {num_beams!r}")
        if init_adapter is not None:
            try:
                read_adapter_config(init_adapter)
            except (FileNotFoundError, ValueError) as err:
                raise type(err)(f"model.init_adapter={init_adapter!r}: {err}") from None
        self.adapter_config = adapter if adapter is not None else MoELoRAConfig()
        if isinstance(self.adapter_config, dict):
            self.adapter_config = MoELoRAConfig.from_dict(self.adapter_config)
        check_quantization(quantization)
        self.base_model, self.gguf_file = resolve_base(base_model, gguf_file, trust_remote_code, model_config)
        self.quantization = quantization
        self.model_config = model_config
        self.torch_dtype = torch_dtype
        self.trust_remote_code = trust_remote_code
        self.gradient_checkpointing = gradient_checkpointing
        self.init_adapter = init_adapter
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.max_new_tokens = max_new_tokens
        self.generate_on_validation = generate_on_validation
        self.answer_protocol, self.num_beams = answer_protocol, num_beams
        evaluation.init_scoring(self, scoring, loglik_prompt, loglik_batch_sequences)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "adapter"])
        self.hparams["adapter"] = dataclasses.asdict(self.adapter_config)
        self._check_targets()
        self.tokenizer = load_tokenizer(self.base_model, trust_remote_code, self.gguf_file)
        self.model: nn.Module | None = None
        self.strict_loading = False  # checkpoints hold adapter tensors only; on_load_checkpoint checks them
        self.correct = nn.ModuleDict()
        self.total = nn.ModuleDict()
        self.predictions: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------------- model
    def _check_targets(self) -> None:
        """Fail before any weights load when ``adapter.target_modules`` match nothing."""
        meta = build_meta_model(self.base_model, self.model_config, self.trust_remote_code, self.gguf_file)
        if not any(n and matches(n, self.adapter_config.target_modules) for n, _ in meta.named_modules()):
            inject_moelora(meta, self.adapter_config)  # raises the ValueError that lists candidates

    def configure_model(self) -> None:
        """Load the frozen base, inject MoELoRA, optionally load ``init_adapter``. Idempotent."""
        if self.model is not None:
            return
        model = load_base_model(self.base_model, self.model_config, self.torch_dtype, self.trust_remote_code,
                                self.gguf_file, self.quantization)
        model.train(self.training)  # from_pretrained returns eval mode; Lightning 2.6 keeps module modes
        inject_moelora(model, self.adapter_config)
        if self.init_adapter:
            load_adapter(model, self.init_adapter)
        if self.gradient_checkpointing:  # non-reentrant: exact for the auxiliary losses (reentrant is refused)
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:  # transformers 5 (gradient_checkpointing_enable is its deprecated alias)
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model
        shard_model(self)  # FSDP2 under ModelParallelStrategy; refuses strategies that cannot train correctly

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None) -> Any:
        set_token_mask(self.model, attention_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def export_adapter(self, out_dir: str | Path) -> Path:
        """Write the adapter folder that :func:`moelora_lit.load_adapter` reads."""
        return save_adapter(self.model, out_dir)

    # -------------------------------------------------------------------------------- training
    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``L = L_task + w_cl sum L_cl + w_bal sum L_bal + w_z sum L_z`` (docs/design.md §1.5)."""
        adapters_of(self.model).set_task_groups(batch.get("task_group"))   # LoRAMoE's localized balance loss
        out = self(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return step_loss(self.model, out.loss)  # Lightning divides the returned loss for gradient accumulation

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", losses["loss"].detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}, batch_size=batch_size)
        shown = {"task": losses["task_loss"], "cl": losses["contrastive_loss"], "bal": losses["balance_loss"]}
        self.log_dict({k: v.detach() for k, v in shown.items()}, prog_bar=True, logger=False, batch_size=batch_size)
        return losses["loss"]

    def on_after_backward(self) -> None:
        """Push this micro-batch's contrastive anchors into the queues (docs/design.md §1.3), after backward so that a
        forward recomputed by gradient checkpointing saw the same queue. Under DDP every rank pushes all ranks'
        anchors in rank order, so the queues stay bit-identical (and DDP's buffer broadcast changes nothing)."""
        if self.model is None:
            return
        distributed = self.trainer.world_size > 1 if self._trainer is not None else False
        after_backward(self.model, all_gather=self.all_gather if distributed else None)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------ evaluation
    def _dataset_names(self, stage: str) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "val_names" if stage == "val" else "test_names", None)
        return list(names or [])

    def setup(self, stage: str) -> None:
        for name in self._dataset_names("val") + self._dataset_names("test"):
            self._metric_key(name)
        evaluation.check_rows(self)

    def _metric_key(self, name: str) -> str:
        """The metrics' key for dataset ``name``, creating its correct/total ``SumMetric`` pair if missing
        (also for dataloaders not known at setup, e.g. passed to ``trainer.test`` directly)."""
        key = name.replace(".", "_")
        if key not in self.correct:
            self.correct[key] = SumMetric().to(self.device)
            self.total[key] = SumMetric().to(self.device)
        return key

    def _name(self, stage: str, dataloader_idx: int) -> str:
        names = self._dataset_names(stage)
        return names[dataloader_idx] if dataloader_idx < len(names) else f"dataset_{dataloader_idx}"

    def _score(self, batch: dict[str, Any], name: str) -> list[dict[str, Any]]:
        """Generate answers for a batch (greedy or beam search) and update the per-dataset accuracy metrics; with
        ``scoring=loglikelihood``, multiple-choice sets are scored by option log-likelihood instead."""
        if batch.get("task") and evaluation.uses_loglik(self, name, batch["task"][0]):
            return evaluation.loglik_rows(self, batch, name, self._metric_key(name))
        texts = generate_texts(self, batch, self.max_new_tokens, self.num_beams)
        tasks = batch.get("task") or [name] * len(texts)  # the registry name decides the answer format
        styles, sources = eval_column(batch, "response"), eval_column(batch, "source_instruction")
        rows = [evaluation.generated_row(name, task, prompt, text, gold, style, source, self.answer_protocol)
                for prompt, text, gold, task, style, source in zip(batch["prompt"], texts, batch["answer"], tasks,
                                                                   styles, sources, strict=True)]
        key = self._metric_key(name)
        self.correct[key].update(torch.tensor(float(sum(r["correct"] for r in rows)), device=self.device))
        self.total[key].update(torch.tensor(float(len(rows)), device=self.device))
        return rows

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self._name("val", dataloader_idx)
        if (batch["labels"][:, 1:] != -100).any():  # a batch of fully truncated responses has no loss
            losses = self.compute_losses(batch)
            several = len(self._dataset_names("val")) > 1  # Lightning refuses one key from several dataloaders
            self.log(f"val/loss/{name}" if several else "val/loss", losses["task_loss"],
                     batch_size=batch["input_ids"].shape[0], add_dataloader_idx=False, sync_dist=True)
        if self.generate_on_validation:
            self._score(batch, name)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.predictions.extend(self._score(batch, self._name("test", dataloader_idx)))

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        return self._score(batch, self._name("test", dataloader_idx))

    def on_validation_epoch_start(self) -> None:
        evaluation.start_epoch(self, "validate")

    def on_validation_epoch_end(self) -> None:
        evaluation.log_accuracy(self, "val", self._dataset_names("val"))

    def on_test_epoch_start(self) -> None:
        self.predictions = []
        evaluation.start_epoch(self, "test")

    def on_test_epoch_end(self) -> None:
        results = evaluation.log_accuracy(self, "test", self._dataset_names("test"))
        evaluation.write_test_outputs(self, results)

    def evaluation_settings(self) -> dict[str, Any]:
        """What decides a test accuracy besides the weights: protocol, decoding, batch and checkpoint."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return {"protocol": self.answer_protocol, "num_beams": self.num_beams, "do_sample": False,
                "max_new_tokens": self.max_new_tokens, "eval_batch_size": getattr(datamodule, "eval_batch_size", None),
                "checkpoint": (self.trainer.ckpt_path if self._trainer is not None else None) or self.init_adapter}

    def on_fit_end(self) -> None:
        """Export the trained adapter to ``<log_dir>/adapter`` (what ``model.init_adapter`` reads)."""
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective: every rank
        self.adapter_trained = True  # a test after fit scores with the training prompt (model.loglik_prompt unset)
        if self.model is None:
            return
        with full_adapter_tensors(self.model):  # whole tensors when sharded (a collective: every rank)
            if self.trainer.is_global_zero:
                self.export_adapter(log_dir / "adapter")

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only adapter tensors and router queues: never the frozen base."""
        with full_adapter_tensors(self.model):  # whole tensors when sharded (a collective: every rank)
            state = adapter_state_dict(self.model, include_queues=True)
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in state.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        state = {k.removeprefix("model."): v for k, v in checkpoint_state_dict(self, checkpoint).items()}
        queues_missing = not any(is_queue_tensor(k) for k in state)
        with full_adapter_tensors(self.model, write_back=True):
            load_adapter_state_dict(self.model, state, source="checkpoint")
        if queues_missing and self.adapter_config.contrastive_weight > 0:
            raise ValueError("checkpoint has no contrastive queues; it was not written by MoELoRAModule")
        checkpoint["state_dict"] = {}
