"""``python -m moelora_lit describe --config X.yaml [--config Y.yaml] [--model.adapter.r 16 ...]``: what a config
builds, as JSON on stdout (and a short table on a terminal's stderr), without loading weights or training.

The config is parsed by the training CLI itself (so every override, preset stack and error is the same), the base
is built on the meta device and the adapter injected; :func:`moelora_lit.describe.describe_model` reports it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from moelora_lit.describe import describe_model, table
from moelora_lit.inject import inject_moelora
from moelora_lit.models.loading import build_meta_model


def describe_config(args: list[str]) -> dict[str, Any]:
    """Parse ``args`` as ``fit`` would, build the model on the meta device and describe it."""
    from moelora_lit.data import ReasoningDataModule
    from moelora_lit.lightning.cli import MoELoRACLI
    from moelora_lit.lightning.module import MoELoRAModule

    cli = MoELoRACLI(MoELoRAModule, ReasoningDataModule, run=False, args=list(args), save_config_callback=None,
                     trainer_defaults={"logger": False})
    module = cli.model
    model = build_meta_model(module.base_model, module.model_config, module.trust_remote_code, module.gguf_file)
    inject_moelora(model, module.adapter_config)
    return describe_model(model)


def main(args: list[str]) -> int:
    description = describe_config(args)
    print(json.dumps(description, indent=2))
    if sys.stderr.isatty():
        print(table(description), file=sys.stderr)
    return 0
