"""The studies and their analysis (``pip install moelora_lit[analysis]``: pandas, scipy, matplotlib, tbparse):
the logic behind ``experiments/studies/*/driver.py``, ``scripts/sweep.py`` and ``notebooks/*.ipynb``. The library
itself never imports this package.

- :mod:`~moelora_lit.analysis.runner`: the one job runner (resumable, ``jobs`` at a time, a log file per run);
- :mod:`~moelora_lit.analysis.study`: a study as data (arms, lr grids, seeds, evaluations) and validation selection;
- :mod:`~moelora_lit.analysis.logs`: the one reader of run folders and TensorBoard scalars;
- :mod:`~moelora_lit.analysis.records`: a study's committed per-example record and the tables built from it;
- :mod:`~moelora_lit.analysis.runs` / :mod:`~moelora_lit.analysis.ablation`: the CPU ablation's grid and files;
- :mod:`~moelora_lit.analysis.stats`: t intervals and paired tests over seeds, Wilson and sign tests over examples;
- :mod:`~moelora_lit.analysis.routing`: specialisation against the step-0 router and a permutation null, entropy;
- :mod:`~moelora_lit.analysis.plots`: the figures (matplotlib imported lazily).

The routing probe callback is :class:`moelora_lit.lightning.probe.RoutingProbe` (re-exported from ``.probe``).
"""

from moelora_lit.analysis.ablation import RESULTS, choose, copy_routing, run_ablation
from moelora_lit.analysis.routing import (
    js_divergence,
    load_summaries,
    paired_layer_difference,
    per_layer,
    permutation_test,
    specialisation,
    specialisation_table,
    summarise,
)
from moelora_lit.analysis.runs import (
    COLUMNS,
    METHODS,
    Run,
    collect,
    command,
    eval_datasets,
    load_results,
    method_alpha,
    method_overrides,
    run_dir,
    run_grid,
    run_rows,
)
from moelora_lit.analysis.stats import (
    CHANCE,
    MEAN,
    REFERENCE,
    interval_table,
    paired_t,
    paired_table,
    per_seed,
    t_interval,
    wide,
)

__all__ = [
    "CHANCE", "COLUMNS", "MEAN", "METHODS", "REFERENCE", "RESULTS", "Run", "choose", "collect", "command",
    "copy_routing", "eval_datasets", "interval_table", "js_divergence", "load_results", "load_summaries",
    "method_alpha", "method_overrides", "paired_layer_difference", "paired_t", "paired_table", "per_layer",
    "per_seed", "permutation_test", "run_ablation", "run_dir", "run_grid", "run_rows", "specialisation",
    "specialisation_table", "summarise", "t_interval", "wide",
]  # fmt: skip
