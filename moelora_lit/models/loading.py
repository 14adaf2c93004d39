"""Finding and loading base models and tokenizers: a local Hugging Face folder, a hub id or a GGUF file
(:mod:`moelora_lit.models.gguf`), optionally quantised (:mod:`moelora_lit.models.quantization`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from moelora_lit.models.gguf import gguf_config, gguf_tokenizer, is_gguf_reference, resolve_gguf
from moelora_lit.models.quantization import bnb_config, check_quantization, quantize_loaded

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE = "moelora_lit/assets/tiny-base"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def check_dtype(torch_dtype: str) -> None:
    """Refuse a ``model.torch_dtype`` that is not one of :data:`DTYPES`."""
    if torch_dtype not in DTYPES:
        raise ValueError(f"model.torch_dtype={torch_dtype!r}: choose one of {', '.join(DTYPES)}")


def _remote_code_error(base_model: str) -> ValueError:
    return ValueError(f"model.base_model={base_model!r} ships its own Python code; set model.trust_remote_code=true "
                      "only if you trust it (docs/security.md)")


def packaged_path(name: str) -> str:
    """``moelora_lit/assets/...`` resolved against the installed package when it is not under the cwd."""
    if name.startswith("moelora_lit/") and not os.path.exists(name):
        packaged = PACKAGE_ROOT.parent / name
        if packaged.exists():
            return str(packaged)
    return name


def resolve_base_model(name: str, trust_remote_code: bool = False, model_config: dict | None = None) -> str:
    """Return a loadable base-model reference, or fail fast with what was tried and how to fix it.

    ``moelora_lit/assets/...`` paths also resolve relative to the installed package, so the embedded
    default works from any working directory.
    """
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")) and model_config is None:
            raise FileNotFoundError(f"model.base_model={name!r} is a folder without config.json; "
                                    "point it at a Hugging Face model folder (save_pretrained output)")
        return name
    if packaged_path(name) != name:
        return packaged_path(name)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name
    if looks_local:
        raise FileNotFoundError(f"model.base_model={name!r}: no such folder. Pass a local Hugging Face folder "
                                "(config.json + weights + tokenizer) or a hub id such as 'meta-llama/Llama-2-7b-hf'.")
    try:
        AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise _remote_code_error(name) from None
        raise FileNotFoundError(f"model.base_model={name!r}: {str(err).splitlines()[0][:200]}") from err
    except OSError as err:
        raise FileNotFoundError(
            f"model.base_model={name!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). Offline, download it elsewhere with "
            "`huggingface-cli download` and set model.base_model to that folder."
        ) from err
    return name


def resolve_base(base_model: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                 model_config: dict | None = None) -> tuple[str, str | None]:
    """``(base_model, gguf_file)`` ready for ``from_pretrained``: GGUF references become folder + file name
    (checked: the file exists, is GGUF, and ``gguf`` is installed); anything else goes through
    :func:`resolve_base_model` and returns ``gguf_file=None``."""
    if is_gguf_reference(base_model, gguf_file):
        if model_config is not None:
            raise ValueError("model.model_config builds a random base; do not combine it with a GGUF base_model")
        return resolve_gguf(base_model, gguf_file)
    return resolve_base_model(base_model, trust_remote_code, model_config), None


def _config(base_model: str, model_config: dict | None, trust_remote_code: bool,
            gguf_file: str | None = None) -> PretrainedConfig:
    if model_config is not None:
        values = dict(model_config)
        model_type = values.pop("model_type", None)
        if model_type is None:
            raise ValueError("model.model_config needs a 'model_type' key (for example 'llama')")
        return AutoConfig.for_model(model_type, **values)
    try:
        if gguf_file is not None:
            return gguf_config(base_model, gguf_file)
        return AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise _remote_code_error(base_model) from None


def build_meta_model(base_model: str, model_config: dict | None = None, trust_remote_code: bool = False,
                     gguf_file: str | None = None) -> nn.Module:
    """The architecture on the meta device: no memory, no weights; for checking module names early."""
    config = _config(base_model, model_config, trust_remote_code, gguf_file)
    if hasattr(config, "quantization_config"):  # GGUF configs carry the loader's marker; the meta copy is plain
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def load_base_model(base_model: str, model_config: dict | None = None, torch_dtype: str = "float32",
                    trust_remote_code: bool = False, gguf_file: str | None = None,
                    quantization: str = "none") -> nn.Module:
    """Pretrained weights from ``base_model`` (a HF folder / hub id, or the folder of ``gguf_file``),
    optionally quantised with bitsandbytes, or a freshly initialised ``model_config`` architecture."""
    check_dtype(torch_dtype)
    check_quantization(quantization)
    dtype = DTYPES[torch_dtype]
    if model_config is not None:
        model = AutoModelForCausalLM.from_config(_config(base_model, model_config, trust_remote_code),
                                                 trust_remote_code=trust_remote_code)
        model = model if dtype == "auto" else model.to(dtype)
        return quantize_loaded(model, quantization, dtype, trust_remote_code)
    if gguf_file is not None:  # transformers refuses a quantization_config together with gguf_file
        model = AutoModelForCausalLM.from_pretrained(base_model, gguf_file=gguf_file, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
        return quantize_loaded(model, quantization, dtype, trust_remote_code)
    compute = torch.float32 if dtype == "auto" else dtype
    return AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype, trust_remote_code=trust_remote_code,
                                                quantization_config=bnb_config(quantization, compute))


def load_tokenizer(base_model: str, trust_remote_code: bool = False, gguf_file: str | None = None) -> Any:
    """The base model's tokenizer with a pad token (eos when it has none), padding on the left (the side
    decoder-only generation needs; training batches are padded by our collator, which sets its own side)."""
    if gguf_file is not None:
        tokenizer = gguf_tokenizer(base_model, gguf_file)
    else:
        tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
