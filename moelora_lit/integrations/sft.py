"""MoELoRA inside TRL's ``SFTTrainer`` (import it from :mod:`moelora_lit.integrations.transformers`)."""

from __future__ import annotations

from typing import Any

import torch
from trl import SFTTrainer

from moelora_lit.inject import moelora_layers
from moelora_lit.integrations.mixin import MoELoRATrainerMixin


class MoELoRASFTTrainer(MoELoRATrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` for a model with MoELoRA layers: the behaviour of
    :class:`~moelora_lit.integrations.transformers.MoELoRATrainer` on top of TRL's data preparation, completion-only
    loss and metrics. Pass the model object (already injected), not a hub id, and no ``peft_config``.

    With a quantised base, TRL casts trainable parameters to bfloat16 (its QLoRA recipe); the MoELoRA adapters and
    routers are put back in float32, as the library keeps them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("peft_config") is not None:
            raise ValueError("MoELoRASFTTrainer: peft_config must be None; the model carries MoELoRA layers already "
                             "(moelora_lit.inject_moelora)")
        super().__init__(*args, **kwargs)
        if getattr(self.model, "is_quantized", False):
            for _, layer in moelora_layers(self.model):
                for param in layer.parameters():
                    if param.requires_grad:
                        param.data = param.data.to(torch.float32)
