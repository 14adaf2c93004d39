"""MoELoRA inside the Hugging Face ``Trainer`` and TRL's ``SFTTrainer`` (docs/design.md §7), without Lightning.

The trainers run the one training step of :mod:`moelora_lit.training_step`, as the Lightning module does: the task
loss plus the weighted auxiliary terms, scaled for gradient accumulation as the Trainer scales its own loss; after
every backward the queue push and FlyLoRA's bias update (each micro-batch; under DDP all ranks' state in rank
order); and adapter files only, never the base weights. On the same
data, seed and optimiser they equal the Lightning path step for step.

Example::

    model = AutoModelForCausalLM.from_pretrained(path)
    inject_moelora(model, MoELoRAConfig(r=16, num_experts=4))
    trainer = MoELoRATrainer(model=model, args=TrainingArguments("out"), train_dataset=ds,
                             data_collator=collator, callbacks=[MoELoRACallback()])
    trainer.train()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import Trainer

from moelora_lit.integrations.callback import MoELoRACallback
from moelora_lit.integrations.mixin import MoELoRATrainerMixin, all_gather_stack, check_moelora_model  # noqa: F401

if TYPE_CHECKING:  # imported on first use (module __getattr__ below): TRL is optional
    from moelora_lit.integrations.sft import MoELoRASFTTrainer

__all__ = ["MoELoRACallback", "MoELoRASFTTrainer", "MoELoRATrainer", "MoELoRATrainerMixin"]


class MoELoRATrainer(MoELoRATrainerMixin, Trainer):
    """``transformers.Trainer`` for a model with MoELoRA layers (:func:`moelora_lit.inject_moelora`).

    Optimises the task loss plus the weighted auxiliary terms, pushes the contrastive queues after every backward,
    logs through :class:`MoELoRACallback` (added if not given) and saves adapter files only.

    Raises:
        ValueError: at construction, when the model has no MoELoRA layer or would run under ``nn.DataParallel``.
    """


def __getattr__(name: str) -> Any:
    # TRL is an optional extra (pip install moelora_lit[hf]); import it only when MoELoRASFTTrainer is asked for.
    if name == "MoELoRASFTTrainer":
        from moelora_lit.integrations.sft import MoELoRASFTTrainer

        return MoELoRASFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
