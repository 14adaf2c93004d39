"""Adapter files and adapter state dicts: what ``save_adapter`` writes and ``load_adapter`` reads (docs/design.md §2).

An adapter folder holds ``adapter_config.json`` (the :class:`MoELoRAConfig`, the wrapped names, the base's name) and
``adapter.safetensors`` (the adapter tensors only, never the base). Which tensors are adapter tensors and which are
queue buffers each layer declares itself (:attr:`MoELoRALinear.adapter_module_names`, :meth:`adapter_tensors`); the
queue buffers are named in :mod:`moelora_lit.queues`; the model's :class:`~moelora_lit.adapters.MoELoRAAdapters`
gathers and restores them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moelora_lit.adapters import adapters_of, require_adapters
from moelora_lit.config import MoELoRAConfig
from moelora_lit.inject import inject_moelora
from moelora_lit.queues import is_queue_key

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


def is_queue_tensor(key: str) -> bool:
    """Whether a state-dict key (``model.layers.0.self_attn.q_proj.contrastive_queue``) names a queue buffer."""
    return is_queue_key(key)


def adapter_state_dict(model: nn.Module, include_queues: bool = False) -> dict[str, Tensor]:
    """Adapter tensors (what each layer's ``adapter_tensors`` names), optionally with the contrastive queues
    (checkpoints)."""
    return require_adapters(model, "adapter_state_dict").state_dict(include_queues)


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor], source: str = "state dict") -> None:
    """Copy adapter (and optional queue) tensors into ``model``; strict about names and shapes."""
    require_adapters(model, "load_adapter_state_dict").load_state_dict(state, source)


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` and ``adapter.safetensors`` (adapter tensors only) atomically."""
    owner = require_adapters(model, "save_adapter")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in owner.state_dict().items()}
    meta = {"format": "moelora_lit.adapter/1", "config": owner.config.to_dict(), "target_names": owner.names,
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
    if adapters_of(model) is None:
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
