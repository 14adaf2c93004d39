"""Reading run folders: the newest Lightning version holding a file, and a version's TensorBoard scalars.

One reader for every study: :func:`newest` finds files, :func:`read_scalars` reads events (tbparse),
:func:`seconds_per_step` and :func:`last_values` turn them into the numbers the studies record.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def newest(root: str | os.PathLike, name: str) -> Path | None:
    """The most recently written file called ``name`` under ``root`` (itself included); None if there is none."""
    root = Path(root)
    found = list(root.rglob(name)) if root.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def find_log_dir(root: str | os.PathLike, name: str = "test_results.json") -> Path | None:
    """The folder of :func:`newest` (a run's ``lightning_logs/version_N`` when ``name`` is a run's output)."""
    path = newest(root, name)
    return None if path is None else path.parent


def read_scalars(version: str | os.PathLike) -> pd.DataFrame:
    """Every scalar of a version folder's TensorBoard events: columns ``tag, step, value, wall_time``."""
    from tbparse import SummaryReader

    frame = SummaryReader(str(version), extra_columns={"wall_time"}).scalars
    columns = ["tag", "step", "value", "wall_time"]
    return frame[columns].sort_values(["tag", "step"]).reset_index(drop=True) if len(frame) else pd.DataFrame(
        columns=columns)


def seconds_per_step(scalars: pd.DataFrame, tag: str = "train/loss") -> float | None:
    """Median wall seconds per optimizer step between successive logs of ``tag``; None with fewer than two."""
    events = scalars[scalars["tag"] == tag].sort_values("step")
    rates = (events["wall_time"].diff() / events["step"].diff())[events["step"].diff() > 0]
    return round(float(rates.median()), 3) if len(rates) else None


def last_values(scalars: pd.DataFrame, prefix: str) -> dict[str, tuple[int, float]]:
    """``{tag: (step, value)}`` of the last event of every tag starting with ``prefix``."""
    part = scalars[scalars["tag"].str.startswith(prefix)].sort_values("step")
    return {tag: (int(block["step"].iloc[-1]), float(block["value"].iloc[-1])) for tag, block in part.groupby("tag")}


def layer_mean_trend(scalars: pd.DataFrame, prefix: str) -> dict[str, float | int] | None:
    """The mean over layers of the tags under ``prefix`` (e.g. ``routing/load_cv/``) at the first and last step."""
    part = scalars[scalars["tag"].str.startswith(prefix)]
    if part.empty:
        return None
    by_step = part.groupby("step")["value"].mean()
    return {"first_step": int(by_step.index[0]), "first": round(float(by_step.iloc[0]), 4),
            "last_step": int(by_step.index[-1]), "last": round(float(by_step.iloc[-1]), 4)}
