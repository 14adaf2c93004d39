"""What a person looks at: labelled routing heatmaps, TensorBoard's custom-scalars layout, the progress bar.

- :func:`heatmap_image` draws a (layers x experts) matrix as a labelled figure with a colour bar;
  :func:`heatmap_grid` as an unlabelled colour grid (microseconds, for very frequent logging).
- :func:`add_tensorboard_layout` writes one multi-line chart per routing statistic across all layers and
  one for the loss terms (TensorBoard's "Custom Scalars" tab), and turns off the ``hp_metric`` placeholder.
- :class:`ProgressBar`: Lightning's TQDM bar on one line: loss terms and it/s, no version number.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

# Custom-scalars charts: (category, chart title, tag regexes). One line per layer (or per loss term).
LAYOUT: list[tuple[str, str, list[str]]] = [
    ("losses", "total and task loss", [r"train/loss$", r"train/task_loss$", r"val/loss$"]),
    ("losses", "auxiliary terms (weighted)", [r"train/contrastive_loss$", r"train/balance_loss$", r"train/z_loss$"]),
    ("routing, every layer", "gate entropy (nats per token)", [r"routing/entropy/.*"]),
    ("routing, every layer", "load CV (std / mean of expert shares)", [r"routing/load_cv/.*"]),
    ("routing, every layer", "max expert load share", [r"routing/max_load/.*"]),
    ("routing, every layer", "min expert load share", [r"routing/min_load/.*"]),
    ("accuracy", "validation", [r"val/acc/.*"]),
    ("accuracy", "test", [r"test/acc/.*"]),
]


@functools.cache
def _viridis() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["viridis"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)     # (256, 3)


def heatmap_grid(matrix: np.ndarray, vmax: float, cell: tuple[int, int] = (8, 24)) -> np.ndarray:
    """A (layers x experts) matrix as an unlabelled (H, W, 3) uint8 viridis grid, ``cell`` pixels per entry.

    Microseconds to draw (no text), so it can be logged every interval. Rows are layers in module order.
    """
    index = np.clip(np.nan_to_num(matrix) / max(vmax, 1e-12), 0.0, 1.0) * 255
    rgb = _viridis()[index.round().astype(np.int64)]                         # (L, N, 3)
    return np.repeat(np.repeat(rgb, cell[0], axis=0), cell[1], axis=1)


def short_layer_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``L3 q_proj`` (``transformer.h.0.attn.c_attn`` -> ``L0 c_attn``): block
    index and projection, what a heatmap row or an axis tick needs; a name without a block index is kept whole."""
    match = re.search(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(?:.*\.)?([^.]+)$", name)
    return f"L{match.group(1)} {match.group(2)}" if match else name


def heatmap_image(matrix: np.ndarray, rows: list[str], title: str, vmax: float | None = None) -> np.ndarray:
    """A (layers x experts) matrix as a labelled (H, W, 3) uint8 figure with a colour bar (matplotlib Agg,
    no pyplot), about 360 pixels wide so TensorBoard shows it unscaled in its default card; rows are labelled
    ``L<block> <projection>``. About 0.1 s for tens of layers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = matrix.shape
    labels = [short_layer_name(r) for r in rows]
    label = 0.06 * max(len(r) for r in labels)                             # inches of y tick labels
    width, height = max(3.6, 1.3 + label + 0.25 * n_cols), max(2.2, 0.9 + 0.125 * n_rows)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=(label + 0.15) / width, right=1 - 0.9 / width, bottom=0.45 / height,
                        top=1 - 0.3 / height)
    ax = fig.add_subplot()
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(n_cols), [str(i) for i in range(n_cols)], fontsize=8)
    step = max(1, math.ceil(n_rows / 48))
    ax.set_yticks(range(0, n_rows, step), labels[::step], fontsize=7)
    ax.set_xlabel("expert", fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.1, pad=0.04).ax.tick_params(labelsize=7)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def tensorboard_writer(trainer: L.Trainer) -> Any | None:
    """The SummaryWriter of the first TensorBoard logger, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def disable_hp_metric(trainer: L.Trainer) -> None:
    """No ``hp_metric = -1`` placeholder card (Lightning's TensorBoardLogger writes it unless told otherwise)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger._default_hp_metric = False  # the constructor argument, for a logger built by the Trainer


def add_tensorboard_layout(trainer: L.Trainer) -> bool:
    """Write :data:`LAYOUT` to the first TensorBoard logger (rank 0); True if written."""
    writer = tensorboard_writer(trainer)
    if writer is None or not trainer.is_global_zero:
        return False
    layout: dict[str, dict[str, list[Any]]] = {}
    for category, title, tags in LAYOUT:
        layout.setdefault(category, {})[title] = ["Multiline", tags]
    writer.add_custom_scalars(layout)
    return True


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, one line per epoch: ``train/loss`` and the loss terms, it/s, no ``v_num``."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
