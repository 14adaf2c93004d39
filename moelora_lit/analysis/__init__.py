"""The ablation and its analysis: the logic behind ``scripts/run_ablation.py`` and ``notebooks/*.ipynb``.

- :mod:`~moelora_lit.analysis.runs`: one ``python -m moelora_lit fit`` per (method, lr, seed), the result rows;
- :mod:`~moelora_lit.analysis.ablation`: the validation sweep, the seeds at the chosen rates, the committed files;
- :mod:`~moelora_lit.analysis.stats`: t intervals, paired differences and tests (numpy only);
- :mod:`~moelora_lit.analysis.routing`: specialisation against the step-0 router and a permutation null, entropy;
- :mod:`~moelora_lit.analysis.plots`: the figures;
- :mod:`~moelora_lit.analysis.probe`: the callback that measures per-example routing in a run (imports torch).

Plots import matplotlib lazily; only the probe runs torch code.
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
