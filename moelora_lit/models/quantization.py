"""Quantised frozen bases (QLoRA-style) through bitsandbytes and transformers' ``BitsAndBytesConfig``.

``model.quantization``: ``none`` (default), ``nf4`` (4-bit NormalFloat, float32 compute, as QLoRA) or
``int8`` (LLM.int8()). Only the base's linear layers are quantised (transformers keeps ``lm_head`` and the
embeddings in float); MoELoRA then wraps the quantised projections and its adapters and routers stay float32.
"""

from __future__ import annotations

import importlib.util
import tempfile
from typing import Any

import torch
from torch import nn

QUANTIZATIONS = ("none", "nf4", "int8")
BNB_PIP = "pip install bitsandbytes==0.50.2"


def check_quantization(quantization: str) -> None:
    """Raise a clear error for an unknown value or a missing bitsandbytes."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"model.quantization={quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"model.quantization={quantization} needs bitsandbytes: {BNB_PIP}")


def bnb_config(quantization: str, compute_dtype: torch.dtype = torch.float32) -> Any:
    """The ``BitsAndBytesConfig`` of ``quantization`` (None for ``none``)."""
    check_quantization(quantization)
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_use_double_quant=False)
    return BitsAndBytesConfig(load_in_8bit=True)


def quantize_loaded(model: nn.Module, quantization: str, dtype: Any, trust_remote_code: bool = False) -> nn.Module:
    """Quantise an already loaded float model (e.g. one dequantised from GGUF, which transformers will not
    combine with a ``quantization_config``): write it to a temporary folder and reload it quantised."""
    from transformers import AutoModelForCausalLM

    config = bnb_config(quantization, torch.float32 if dtype == "auto" else dtype)
    if config is None:
        return model
    model.hf_quantizer = None  # the GGUF loader's marker; the float weights themselves are plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with tempfile.TemporaryDirectory(prefix="moelora-quant-") as folder:
        model.save_pretrained(folder)
        del model
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype,
                                                    trust_remote_code=trust_remote_code)


def is_quantized_linear(module: nn.Module) -> bool:
    """True for bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def base_memory_bytes(model: nn.Module) -> int:
    """Bytes of the frozen base's parameters and buffers (adapter tensors, FlyLoRA's rank bias and router queues
    excluded); for 4-bit layers this is the packed storage plus its quantisation state (absmax per 64-block)."""
    total = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("contrastive_queue") or leaf == "rank_bias" or ".lora_" in name or ".router" in name:
            continue
        total += tensor.numel() * tensor.element_size()
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total
