"""Reasoning datasets (LLM-Adapters format, hub formats, synthetic suite) as a LightningDataModule.

The names below load on first use, so ``moelora_lit.data.synthetic`` (the suite, used by the analysis and the
notebooks) imports without torch, Lightning or ``datasets``.
"""

from importlib import import_module

_WHERE = {
    "DatasetSpec": "specs",
    "ReasoningDataModule": "datamodule",
    "REGISTRY": "formats",
    "convert_rows": "formats",
    "detect_format": "formats",
    "resolve_name": "formats",
    "build_prompt": "prompts",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'moelora_lit.data' has no attribute {name!r}")
    return getattr(import_module(f"moelora_lit.data.{_WHERE[name]}"), name)
