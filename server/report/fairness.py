"""Fairness across sites: pure functions, per-site metrics in, tables and summaries out.

Nothing here reads files or runs a model, so every number can be recomputed by hand.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["ConfidenceInterval", "FairnessSummary", "bootstrap_ci", "summarize_sites", "site_table"]


@dataclass
class ConfidenceInterval:
    """Mean of per-case values with a percentile-bootstrap interval; ``n`` finite cases."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_ci(values, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> ConfidenceInterval:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs are dropped first).

    Cases are resampled with replacement ``n_resamples`` times. One case gives a zero-width
    interval and no case gives NaNs: an interval cannot be wider than the data allow.

    Args:
        values: per-case numbers, e.g. one site's per-case Dice of one label.
        confidence: interval coverage, in (0, 1); 0.95 by default.
        n_resamples: bootstrap resamples (>= 1).
        seed: random seed, so the same values always give the same interval.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return ConfidenceInterval(math.nan, math.nan, math.nan, 0)
    mean = float(arr.mean())
    if arr.size == 1:
        return ConfidenceInterval(mean, mean, mean, 1)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n_resamples, arr.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return ConfidenceInterval(mean, float(low), float(high), int(arr.size))


@dataclass
class FairnessSummary:
    """How evenly a model serves the sites, on one per-site score (higher is better).

    ``gap`` is best - worst, ``ratio`` worst / best, ``std`` the population standard
    deviation (ddof=0) over sites; ``flagged`` lists sites scoring below ``threshold``.
    Sites whose score is NaN (nothing to measure) are listed in ``unscored``.
    """

    worst_site: str | None
    worst: float
    best_site: str | None
    best: float
    gap: float
    ratio: float
    std: float
    mean: float
    threshold: float
    flagged: list[str] = field(default_factory=list)
    unscored: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_sites(scores: dict[str, float], threshold: float = 0.7) -> FairnessSummary:
    """Worst and best site, gap, ratio, spread and sites below ``threshold``.

    Args:
        scores: per-site score, e.g. ``{"hospital-a": 0.91, "hospital-b": 0.84}``.
        threshold: sites strictly below it are flagged.

    Examples::

        summarize_sites({"a": 0.9, "b": 0.6}, threshold=0.7).flagged  # ["b"]
    """
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    scored = {k: float(v) for k, v in scores.items() if v is not None and math.isfinite(float(v))}
    unscored = sorted(k for k in scores if k not in scored)
    if not scored:
        nan = math.nan
        return FairnessSummary(None, nan, None, nan, nan, nan, nan, nan, threshold, [], unscored)
    # Ties resolve by site name so the summary is deterministic.
    worst_site = min(sorted(scored), key=lambda k: scored[k])
    best_site = max(sorted(scored), key=lambda k: scored[k])
    worst, best = scored[worst_site], scored[best_site]
    values = np.array(list(scored.values()))
    return FairnessSummary(
        worst_site=worst_site,
        worst=worst,
        best_site=best_site,
        best=best,
        gap=best - worst,
        ratio=worst / best if best > 0 else math.nan,
        std=float(values.std()),
        mean=float(values.mean()),
        threshold=threshold,
        flagged=sorted((k for k, v in scored.items() if v < threshold), key=lambda k: (scored[k], k)),
        unscored=unscored,
    )


def site_table(
    per_case: dict[str, list[dict[int, float]]],
    labels: dict[int, str],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    groups: dict[str, tuple[int, ...]] | None = None,
) -> list[dict]:
    """One row per site: case count, per-label Dice and the per-case mean Dice, each with a CI.

    Args:
        per_case: ``site -> [ {label: dice, ...} per case ]``; NaN marks a label absent from a case.
        labels: foreground label ids and names, e.g. ``{1: "grey matter", 2: "white matter"}``.
        groups: extra per-case means over label subsets, e.g. ``{"tissue": (1, 2)}`` adds
            ``row["dice"]["tissue"]``. ``row["dice"]["mean"]`` is always the mean over ``labels``.

    The mean over labels is taken per case first (NaN labels skipped) and then bootstrapped
    over cases, so the interval reflects case-to-case variation.
    """
    rows = []
    for site, cases in per_case.items():
        row: dict = {"site": site, "n_cases": len(cases), "dice": {}}
        for label in labels:
            row["dice"][label] = bootstrap_ci(
                [c.get(label, math.nan) for c in cases], confidence, n_resamples, seed
            ).to_dict()
        for group, members in {"mean": tuple(labels), **(groups or {})}.items():
            case_means = []
            for c in cases:
                finite = [c[k] for k in members if k in c and math.isfinite(c[k])]
                case_means.append(float(np.mean(finite)) if finite else math.nan)
            row["dice"][group] = bootstrap_ci(case_means, confidence, n_resamples, seed).to_dict()
        rows.append(row)
    return rows
