"""Student-t statistics over seeds in numpy only (no scipy): intervals, paired differences and tests.

Seeds are the unit of replication: a method's accuracy on a task is one number per seed. ``python -m moelora_lit
report`` and the ablation's analysis (:mod:`moelora_lit.analysis.stats`) both use these.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Numerical Recipes, modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided p-value of a Student t statistic: P(|T| >= |t|) with ``df`` degrees of freedom."""
    if not np.isfinite(t):
        return 0.0 if np.isinf(t) else float("nan")
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t, by bisection on :func:`t_sf2`."""
    lo, hi, target = 0.0, 1e4, 2.0 * (1.0 - p)
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_sf2(mid, df) > target else (lo, mid)
    return (lo + hi) / 2.0


def t_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n): the mean of ``values`` and its two-sided t interval (NaN bounds for n < 2)."""
    x = np.asarray(list(values), dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    if n < 2:
        return mean, float("nan"), float("nan"), n
    half = _half_width(x, level)
    return mean, mean - half, mean + half, n


def _half_width(x: np.ndarray, level: float) -> float:
    """Half-width of the two-sided t interval of the mean of ``x`` (n >= 2)."""
    return t_critical(len(x) - 1, level) * float(x.std(ddof=1)) / math.sqrt(len(x))


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Paired comparison of ``a`` and ``b`` (same seeds, same order): mean difference a - b, its t interval,
    the t statistic and the two-sided p-value of the paired t-test (NaN when undefined)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean, lo, hi, n = t_interval(d, level)
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    if n < 2:
        t, p = float("nan"), float("nan")
    elif sd == 0.0:
        t, p = (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    else:
        t = mean / (sd / math.sqrt(n))
        p = t_sf2(t, n - 1)
    return {"diff": mean, "low": lo, "high": hi, "t": t, "p": p, "n": n}


def t_critical(df: int, level: float = 0.95) -> float:
    """Two-sided ``level`` Student-t quantile with ``df`` degrees of freedom (4.303 for df=2 at 95%)."""
    return t_quantile(0.5 + level / 2.0, df)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its two-sided t interval (nan for a single value)."""
    x = np.asarray(list(values), dtype=float)
    return float(x.mean()), (_half_width(x, level) if len(x) > 1 else math.nan)
