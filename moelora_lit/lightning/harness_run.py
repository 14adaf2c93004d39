"""``python -m moelora_lit lm-eval``: lm-evaluation-harness on the model ``test`` builds (base + MoELoRA adapter).

::

    python -m moelora_lit lm-eval --config X.yaml [--model.init_adapter RUN/adapter] --tasks moelora_arc_easy \\
        --data moelora_arc_easy=ARC-Easy/test.json [--include_path DIR] [--limit N] [--num_fewshot K]

The config (and any ``--model.* / --data.* / --trainer.*`` override) is parsed by the same LightningCLI as
``test``; :meth:`MoELoRAModule.configure_model` builds the model (base, quantisation, adapter), which is handed to
``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=...)``. The shipped ``moelora_*`` tasks
(:mod:`moelora_lit.eval.harness_tasks`, :mod:`moelora_lit.eval.harness`) read LLM-Adapters-format files offline;
``--data TASK=PATH`` points one at a file. Everything lands in a new run folder ``<output_dir>/version_<n>``:
``results.json`` (the harness's results), ``tasks/`` (the task YAMLs used), ``command.txt`` and with
``--log_samples`` ``samples_<task>.jsonl``. Needs the ``eval`` extra (``pip install -e .[eval]``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from moelora_lit.data import ReasoningDataModule
from moelora_lit.eval.harness import data_files, shipped_tasks, write_task_yamls
from moelora_lit.lightning.checks import describe_error, is_user_error
from moelora_lit.lightning.cli import MoELoRACLI
from moelora_lit.lightning.module import MoELoRAModule

INSTALL = "pip install -e .[eval]  (lm-eval==0.4.13)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moelora_lit lm-eval", description=__doc__.split("\n\n")[0],
                                epilog="Other arguments (--config, --model.*, --data.*, --trainer.*) go to the "
                                       "LightningCLI that `test` uses.")
    p.add_argument("--tasks", required=True, help="comma-separated harness task names, e.g. moelora_arc_easy")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="the LLM-Adapters-format file a shipped moelora_* task reads (repeatable)")
    p.add_argument("--include_path", action="append", default=[], help="a folder of more task YAMLs")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=16, help="HFLM batch size")
    p.add_argument("--output_dir", default=None, help="default: <trainer.default_root_dir>/lm_eval")
    p.add_argument("--log_samples", action="store_true", help="also write samples_<task>.jsonl (per document)")
    return p


def _run_folder(root: Path) -> Path:
    n = 0
    while (root / f"version_{n}").exists():
        n += 1
    return root / f"version_{n}"


def run(argv: list[str]) -> dict[str, Any]:
    """Parse, build the model as ``test`` does, run the harness and write the run folder; returns the results."""
    args, rest = parser().parse_known_args(argv)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable
    except ImportError as err:
        raise ImportError(f"lm-eval: the harness is not installed ({err}); {INSTALL}") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for path in args.include_path:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--include_path {path}: not a folder")
    files = data_files(args.data)
    cli = MoELoRACLI(MoELoRAModule, ReasoningDataModule, run=False, args=rest, save_config_callback=None,
                     parser_kwargs={"exit_on_error": False})
    root = Path(args.output_dir or Path(cli.trainer.default_root_dir) / "lm_eval")
    out = _run_folder(root)
    write_task_yamls(out / "tasks", files)
    include = [str(out / "tasks"), *args.include_path]
    manager = TaskManager(include_path=include, include_defaults=False)  # indexing lm-eval's own tasks takes ~10 s
    if any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; shipped: {', '.join(shipped_tasks())} (or any "
                         "lm-eval task, which needs the hub, or one under --include_path)")
    module = cli.model
    module.configure_model()
    model = module.model.eval()
    lm = HFLM(pretrained=model, tokenizer=module.tokenizer, batch_size=args.batch_size, backend="causal")
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                      task_manager=manager, log_samples=args.log_samples)
    results = json.loads(json.dumps(results, default=handle_non_serializable))
    for task, samples in results.pop("samples", {}).items():
        with open(out / f"samples_{task}.jsonl", "w") as f:
            f.writelines(json.dumps(sample) + "\n" for sample in samples)
    results["moelora"] = {"base_model": module.base_model, "gguf_file": module.gguf_file,
                          "init_adapter": module.init_adapter, "torch_dtype": module.torch_dtype,
                          "quantization": module.quantization, "data_files": files}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "command.txt").write_text("python -m moelora_lit lm-eval " + shlex.join(argv) + "\n")
    for task, metrics in results.get("results", {}).items():
        shown = {k: v for k, v in metrics.items() if isinstance(v, float)}
        print(f"{task}: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    print(f"(results.json in {out})")
    return results


def main(argv: list[str]) -> int:
    """The ``lm-eval`` tool: exit code 0, or 2 with one ``error:`` line on bad input (``MOELORA_DEBUG=1``:
    traceback)."""
    try:
        run(argv)
    except Exception as err:
        if os.environ.get("MOELORA_DEBUG", "") not in ("", "0") or not (is_user_error(err)
                                                                       or isinstance(err, ImportError)):
            raise
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 2
    return 0
