"""Routing statistics: gate entropy, expert load and per-dataset expert use, logged to TensorBoard (docs/design.md §3).

The per-step work is a handful of tiny on-device reductions over all layers at once (no host sync);
the accumulators are reduced across ranks and turned into scalars only once per logging interval.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from moelora_lit.inject import moelora_layers
from moelora_lit.layer import MoELoRALinear
from moelora_lit.lightning.figures import (
    add_tensorboard_layout,
    disable_hp_metric,
    heatmap_grid,
    heatmap_image,
    tensorboard_writer,
)
from moelora_lit.routing_stats import RoutingAccumulator, gate_entropy, layer_metrics, load_cv, load_shares

__all__ = ["RoutingAccumulator", "RoutingStatsCallback", "gate_entropy", "load_cv", "load_shares"]

_DATASET_NAMES = {"validate": "val_names", "test": "test_names"}


def _tag_name(name: str) -> str:
    """Layer name inside the wrapped HF model: strip the LightningModule's attribute prefix ``model.`` once."""
    return name[len("model."):] if name.startswith("model.") else name


def heatmap_values(load: Tensor, counts: list[int]) -> tuple[np.ndarray, float, str]:
    """What a load heatmap shows: the share per expert (colour scale to twice the fair share 1/N) when every layer
    has N experts; with different counts per layer (MoLA, MixLoRA's LoRA layers beside its blocks) the share relative
    to the layer's own fair share (1 = balanced, scale to 2), so a 2-expert layer is not drawn saturated."""
    if len(set(counts)) == 1:
        return load.cpu().numpy(), 2.0 / counts[0], "expert load share"
    n = torch.tensor(counts, device=load.device)[:, None]                                # (L, 1)
    valid = torch.arange(load.shape[-1], device=load.device) < n                       # (L, N)
    relative = (load * n.to(load.dtype)).masked_fill(~valid, float("nan"))           # no such expert: blank
    return relative.cpu().numpy(), 2.0, "expert load / the layer's fair share"


class RoutingStatsCallback(L.Callback):
    """Logs MoELoRA routing statistics (docs/design.md §3, "Callbacks").

    Training (every ``log_every_n_steps`` optimizer steps, accumulated over the interval and summed
    across ranks): ``routing/entropy/<layer>`` (mean gate entropy per real token), ``routing/load_cv/<layer>``
    (population std / mean of the load shares), ``routing/max_load/<layer>``, ``routing/min_load/<layer>``,
    optionally ``routing/load/<layer>/expert_<i>``, and the image ``routing/load_heatmap`` (rows: layers in
    module order, columns: experts; colour 0 to twice the fair share ``2/N``, so a balanced router is mid-scale).
    Scalars go to every logger at step ``global_step - 1``, the step Lightning gives that step's ``train/*``.

    Validation/test: forward hooks accumulate every forward's gates (prefill and decode steps) per
    evaluation dataloader; at the end: ``routing/<stage>_entropy/<dataset>``, ``routing/<stage>_load_cv/<dataset>``
    (means over layers), the image ``routing/<stage>_load_heatmap/<dataset>``, ``self.eval_load[stage][dataset]``
    (layers x N CPU tensor) and ``<log_dir>/routing_<stage>.json``. ``stage`` is ``validate`` or ``test``.

    Args:
        log_every_n_steps: logging interval in optimizer steps; None uses ``trainer.log_every_n_steps``.
        heatmap_every_n_logs: draw the training heatmap every this many intervals; 0 never.
        heatmap_labels: draw the training heatmap as a labelled figure (layer names, expert index, colour bar;
            about 0.2 s for 28 layers) instead of an unlabelled colour grid (microseconds). Evaluation heatmaps
            are always labelled.
        log_expert_loads: also log each expert's training load share as a scalar.
        eval_stats: collect per-dataset statistics in validation and test.
        tensorboard_layout: write the custom-scalars layout (one chart per statistic across all layers, one for
            the loss terms) and drop the ``hp_metric`` placeholder.
    """

    def __init__(self, log_every_n_steps: int | None = None, heatmap_every_n_logs: int = 5,
                 heatmap_labels: bool = True, log_expert_loads: bool = True, eval_stats: bool = True,
                 tensorboard_layout: bool = True) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"RoutingStatsCallback: log_every_n_steps={log_every_n_steps} must be >= 1 or None")
        if heatmap_every_n_logs < 0:
            raise ValueError(f"RoutingStatsCallback: heatmap_every_n_logs={heatmap_every_n_logs} must be >= 0")
        self.log_every_n_steps = log_every_n_steps
        self.heatmap_every_n_logs = heatmap_every_n_logs
        self.heatmap_labels = heatmap_labels
        self.log_expert_loads = log_expert_loads
        self.eval_stats = eval_stats
        self.tensorboard_layout = tensorboard_layout
        self.eval_load: dict[str, dict[str, Tensor]] = {}
        self._layers: list[MoELoRALinear] = []
        self._names: list[str] = []
        self._train: RoutingAccumulator | None = None
        self._seen: list[Tensor | None] = []
        self._last_logged = -1
        self._n_logs = 0
        self._eval: list[RoutingAccumulator] = []
        self._eval_idx = 0
        self._hooks: list[Any] = []

    def _find_layers(self, pl_module: L.LightningModule) -> bool:
        found = list(moelora_layers(pl_module))
        self._names = [_tag_name(name) for name, _ in found]
        self._layers = [layer for _, layer in found]
        return bool(self._layers)

    def _expert_counts(self) -> list[int]:
        return [layer.num_experts for layer in self._layers]

    def _new_accumulator(self, pl_module: L.LightningModule) -> RoutingAccumulator:
        return RoutingAccumulator(len(self._layers), self._expert_counts(), pl_module.device)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.tensorboard_layout:
            disable_hp_metric(trainer)  # before the Trainer logs the hyper-parameters

    # ---------------------------------------------------------------- training
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train = self._new_accumulator(pl_module) if self._find_layers(pl_module) else None
        if self.tensorboard_layout:
            add_tensorboard_layout(trainer)
        self._seen = [None] * len(self._layers)
        self._last_logged = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._train is None:
            return
        self._accumulate_train()
        step = trainer.global_step
        interval = self.log_every_n_steps or trainer.log_every_n_steps
        if interval and step != self._last_logged and step % interval == 0:
            self._last_logged = step
            self._log_train(trainer)

    def _accumulate_train(self) -> None:
        """Add every layer's latest gates; one batched update when all layers saw the same tokens."""
        fresh = [i for i, layer in enumerate(self._layers)
                 if layer.last_gates is not None and layer.last_gates is not self._seen[i]]
        if not fresh:
            return
        gates = [self._layers[i].last_gates for i in fresh]
        masks = [self._layers[i].last_token_mask for i in fresh]
        for i, g in zip(fresh, gates, strict=True):
            self._seen[i] = g
        if len(fresh) == len(self._layers) and all(g.shape == gates[0].shape for g in gates):
            if all(m is masks[0] for m in masks):
                mask = masks[0]                                             # (T,) broadcast over layers
            else:
                mask = torch.stack([torch.ones(g.shape[0], dtype=torch.bool, device=g.device) if m is None else m
                                    for g, m in zip(gates, masks, strict=True)])    # (L, T)
            self._train.update(torch.stack(gates), mask)                     # (L, T, N)
        else:
            for i, g, m in zip(fresh, gates, masks, strict=True):
                self._train.update(g, m, layer=i)

    def _log_train(self, trainer: L.Trainer) -> None:
        acc = self._train
        acc.load(trainer.strategy.reduce(acc.packed.clone(), reduce_op="sum"))
        self._n_logs += 1
        if trainer.is_global_zero and trainer.loggers:
            stats = {k: v.cpu() for k, v in acc.stats().items()}             # the one host sync per interval
            counts = acc.count.tolist()
            metrics = layer_metrics(self._names, stats, counts)
            if self.log_expert_loads:
                for row, name in enumerate(self._names):
                    if counts[row] > 0:
                        shares = stats["load"][row].tolist()
                        metrics |= {f"routing/load/{name}/expert_{i}": v for i, v in enumerate(shares)}
            step = max(trainer.global_step - 1, 0)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            writer = tensorboard_writer(trainer)
            every = self.heatmap_every_n_logs
            if writer is not None and metrics and every and (self._n_logs - 1) % every == 0:
                load, vmax, what = heatmap_values(stats["load"], self._expert_counts())
                image = (heatmap_image(load, self._names, f"{what}, step {step}", vmax)
                         if self.heatmap_labels else heatmap_grid(load, vmax))
                writer.add_image("routing/load_heatmap", image, step, dataformats="HWC")
        acc.reset()

    # ---------------------------------------------------------------- evaluation
    def _eval_start(self, trainer: L.Trainer, pl_module: L.LightningModule, num_dataloaders: int) -> None:
        self._remove_hooks()
        self._eval, self._eval_idx = [], 0
        if not self.eval_stats or trainer.sanity_checking or not self._find_layers(pl_module):
            return
        self._eval = [self._new_accumulator(pl_module) for _ in range(max(num_dataloaders, 1))]
        for row, layer in enumerate(self._layers):
            self._hooks.append(layer.register_forward_hook(self._make_hook(row)))

    def _make_hook(self, row: int) -> Callable[..., None]:
        def hook(module: MoELoRALinear, args: Any, output: Any) -> None:
            if module.last_gates is not None and self._eval_idx < len(self._eval):
                self._eval[self._eval_idx].update(module.last_gates, module.last_token_mask, layer=row)
        return hook

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _eval_end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hooks()
        if not self._eval:
            return
        packed = torch.stack([acc.packed for acc in self._eval])            # (D, L, 2N+2): one all-reduce
        packed = trainer.strategy.reduce(packed, reduce_op="sum")
        log_dir = trainer.log_dir                                           # a collective: call on every rank
        attr = _DATASET_NAMES[stage]
        names = list(getattr(trainer.datamodule, attr, None) or getattr(pl_module, attr, None) or [])
        results: dict[str, dict[str, Tensor]] = {}
        for idx, acc in enumerate(self._eval):
            acc.load(packed[idx])
            if bool((acc.count > 0).any()):
                dataset = str(names[idx]) if idx < len(names) and names[idx] else f"dataset_{idx}"
                results[dataset] = {k: v.cpu() for k, v in acc.stats().items()} | {"tokens": acc.count.cpu()}
        self._eval = []
        self.eval_load[stage] = {dataset: r["load"] for dataset, r in results.items()}
        if trainer.is_global_zero and results:
            self._write_eval(trainer, stage, results, log_dir)

    def _write_eval(self, trainer: L.Trainer, stage: str, results: dict[str, dict[str, Tensor]],
                    log_dir: str | None) -> None:
        step = trainer.global_step
        metrics = {}
        for dataset, r in results.items():
            metrics[f"routing/{stage}_entropy/{dataset}"] = float(r["entropy"].mean())
            metrics[f"routing/{stage}_load_cv/{dataset}"] = float(r["cv"].mean())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        writer = tensorboard_writer(trainer)
        for dataset, r in results.items() if writer is not None else ():
            load, vmax, what = heatmap_values(r["load"], self._expert_counts())
            vmax = max(vmax, float(np.nanmax(load)))
            image = heatmap_image(load, self._names, f"{stage} {what}: {dataset}", vmax)
            writer.add_image(f"routing/{stage}_load_heatmap/{dataset}", image, step, dataformats="HWC")
        if log_dir is not None:
            payload = {"stage": stage, "step": step, "layers": self._names,
                       "datasets": {d: r["load"].tolist() for d, r in results.items()},
                       "routed": {d: r["routed"].tolist() for d, r in results.items()},
                       "entropy": {d: r["entropy"].tolist() for d, r in results.items()},
                       "tokens": {d: int(r["tokens"].max()) for d, r in results.items()}}
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / f"routing_{stage}.json").write_text(json.dumps(payload, indent=1))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start(trainer, pl_module, len(trainer.num_val_batches))

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start(trainer, pl_module, len(trainer.num_test_batches))

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_idx = dataloader_idx

    on_test_batch_start = on_validation_batch_start

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(trainer, pl_module, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(trainer, pl_module, "test")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
