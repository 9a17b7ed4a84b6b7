"""Statistics of the ablation: seed spread, paired per-case differences with bootstrap CIs, generated claims.

Every sentence of the ablation outputs that compares two variants comes from :func:`claim`, i.e.
from the paired bootstrap interval: "better"/"worse" only where the 95 % CI of the per-case
difference excludes 0, otherwise "no detectable difference".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["mean_sd", "paired_difference", "claim", "BOOTSTRAP_SAMPLES"]

BOOTSTRAP_SAMPLES = 5000


def mean_sd(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (ddof 1) of the finite values; sd is nan for fewer than 2."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else math.nan, "n": int(v.size)}


def paired_difference(
    a: Sequence[float], b: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = 0.95
) -> dict:
    """Mean of the per-case differences ``a - b`` and its percentile bootstrap CI (cases resampled).

    ``a[i]`` and ``b[i]`` are the same test case (e.g. each case's Dice averaged over seeds);
    pairs with a non-finite member are dropped. Returns ``{"diff", "low", "high", "n"}``.
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired samples differ in length: {a_arr.shape} vs {b_arr.shape}")
    d = (a_arr - b_arr)[np.isfinite(a_arr) & np.isfinite(b_arr)]
    if d.size == 0:
        return {"diff": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, d.size, size=(samples, d.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "n": int(d.size)}


def claim(a: str, b: str, where: str, result: dict, what: str = "Dice") -> str:
    """One sentence comparing ``a`` with ``b`` at ``where``, generated from :func:`paired_difference`."""
    n = result["n"]
    if n == 0 or not np.isfinite(result["diff"]):
        return f"{where}: {a} vs {b}: no paired cases."
    numbers = f"{what} difference {result['diff']:+.3f}, 95% CI [{result['low']:+.3f}, {result['high']:+.3f}], n={n}"
    if result["low"] > 0:
        verdict = f"{a} is better than {b}"
    elif result["high"] < 0:
        verdict = f"{a} is worse than {b}"
    else:
        verdict = f"no detectable difference between {a} and {b}"
    return f"{where}: {verdict} ({numbers})."
