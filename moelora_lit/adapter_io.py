"""Adapter files and adapter state dicts: what ``save_adapter`` writes and ``load_adapter`` reads (docs/design.md §2).

An adapter folder holds ``adapter_config.json`` (the :class:`MoELoRAConfig`, the wrapped names, the base's name) and
``adapter.safetensors`` (the adapter tensors only, never the base). Which tensors are adapter tensors and which are
queue buffers each layer declares itself (:attr:`MoELoRALinear.adapter_module_names`,
:attr:`MoELoRALinear.queue_tensor_names`, :meth:`MoELoRALinear.adapter_tensors`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moelora_lit.config import MoELoRAConfig
from moelora_lit.inject import inject_moelora, moelora_layers
from moelora_lit.layer import MoELoRALinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


def is_queue_tensor(key: str) -> bool:
    """Whether a state-dict key (``model.layers.0.self_attn.q_proj.contrastive_queue``) names a queue buffer."""
    return key.rsplit(".", 1)[-1] in MoELoRALinear.queue_tensor_names


def adapter_state_dict(model: nn.Module, include_queues: bool = False) -> dict[str, Tensor]:
    """Adapter tensors (what each layer's :meth:`~MoELoRALinear.adapter_tensors` names), optionally with the
    contrastive queues (checkpoints)."""
    return {f"{name}.{key}": tensor for name, layer in moelora_layers(model)
            for key, tensor in layer.adapter_tensors(include_queues).items()}


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor], source: str = "state dict") -> None:
    """Copy adapter (and optional queue) tensors into ``model``; strict about names and shapes."""
    own = adapter_state_dict(model, include_queues=True)
    required = {k for k in own if not is_queue_tensor(k)}
    missing = sorted(required - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         "(was it saved from the same base model with the same target_modules?)")
    for key, tensor in state.items():
        if tensor.shape != own[key].shape:
            raise ValueError(f"{source}: tensor {key} has shape {tuple(tensor.shape)} but the model expects "
                             f"{tuple(own[key].shape)} (check r, num_experts and the base model)")
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor.to(own[key].dtype))


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` and ``adapter.safetensors`` (adapter tensors only) atomically."""
    config: MoELoRAConfig | None = getattr(model, "moelora_config", None)
    if config is None:
        raise ValueError("save_adapter: the model has no MoELoRA adapter; call inject_moelora first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    meta = {"format": "moelora_lit.adapter/1", "config": config.to_dict(),
            "target_names": [name for name, _ in moelora_layers(model)],
            "base_model": getattr(getattr(model, "config", None), "_name_or_path", None)}
    _atomic_write(out / ADAPTER_WEIGHTS, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    _atomic_write(out / ADAPTER_CONFIG, lambda path: Path(path).write_text(json.dumps(meta, indent=2)))
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> MoELoRAConfig:
    """The :class:`MoELoRAConfig` saved in an adapter folder."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        meta = json.loads(path.read_text())
        return MoELoRAConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a moelora_lit adapter config: {err}") from err


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``.

    A model without MoELoRA layers is injected with the saved config first; an injected one must have
    the same layer names and shapes (a clear ValueError names the first mismatch).
    """
    config = read_adapter_config(adapter_dir)
    if not any(True for _ in moelora_layers(model)):
        inject_moelora(model, config)
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    load_adapter_state_dict(model, load_file(str(weights)), source=str(weights))
    return model


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
