"""moelora_lit: MoELoRA (contrastive mixture of LoRA experts) on PyTorch Lightning."""

from moelora_lit.adapter_io import adapter_state_dict, load_adapter, save_adapter
from moelora_lit.config import MoELoRAConfig
from moelora_lit.inject import collect_aux_losses, inject_moelora, moelora_layers, push_queues, set_token_mask
from moelora_lit.layer import MoELoRALinear

__all__ = [
    "MoELoRAConfig",
    "MoELoRALinear",
    "MoELoRAModule",
    "ReasoningDataModule",
    "adapter_state_dict",
    "collect_aux_losses",
    "inject_moelora",
    "load_adapter",
    "moelora_layers",
    "push_queues",
    "save_adapter",
    "set_token_mask",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The Lightning classes import lightning/transformers; load them only when asked for.
    if name == "MoELoRAModule":
        from moelora_lit.lightning.module import MoELoRAModule

        return MoELoRAModule
    if name == "ReasoningDataModule":
        from moelora_lit.data import ReasoningDataModule

        return ReasoningDataModule
    raise AttributeError(f"module 'moelora_lit' has no attribute {name!r}")
