"""Out-of-distribution warning: an intensity summary that ignores a scanner's ``s*x + b`` but not its curve.

Instance norm cancels any ``s*x + b`` with ``s > 0``; it does not cancel a non-linear contrast
curve (gamma) or a bias field. So the summary of a volume describes the **shape** of its brain
intensities, with location and scale removed:

1. standardise the whole volume, ``z = (x - mean) / std`` (invariant to ``s*x + b``, ``s > 0``);
2. foreground = ``z`` above Otsu's threshold of ``z`` (computed on ``z``, so invariant too), and
   standardise it again;
3. features: its quantiles :data:`QUANTILES` (the histogram's shape: a gamma curve bends it),
   and the spread across a 4x4x4 grid of blocks of the median bright-tissue intensity (a bias
   field makes the same tissue brighter in one corner than in another).

Each site summarises its training volumes itself and shares only aggregates: volume count,
mean feature vector, summed squared deviations from it, and the mean feature vector of its
volumes under each "where instance norm stops" level of the fairness report. Never an image,
never one volume's features. The record of every site is stored with the model in the
registry (``<registry>/<version>/ood.json``). For an upload the API computes the same features,
measures each in units of the pooled within-site standard deviation from a site's mean, and
takes the RMS over the quantiles and the RMS over the two block features; the larger of the
two, at the nearest site, is the **score**.

Threshold: :data:`THRESHOLD` = 2. In those units a scan like the training scans has an RMS
near 1 (that is what the pooled standard deviation measures), so 2 means "on average twice as
far from every site as training scans vary among themselves". Measured on the test sites
(4 mm, three sites, ``tests/shared/test_ood.py``): training scans 0.2-1.3, held-out scans
0.2-0.5, and the same scans under any ``s*x + b`` exactly the same; gamma 0.5 2.2-2.6, gamma
0.35 3.1-3.9, gamma 2.0 1.7-2.0. A bias field's effect depends on its random shape: over 8
random fields per held-out scan, amplitude 0.5 scores 0.9-4.2 (10 of 24 flagged), 0.7 1.2-4.6
(14 of 24), 0.9 1.4-4.8 (17 of 24). So the warning starts where the report's "where instance
norm stops" table shows agreement falling (gamma 0.5 and stronger), and never for a scanner affine.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from shared.scanner import REFERENCE_RANGE, ScannerProfile, apply_scanner

__all__ = [
    "QUANTILES",
    "THRESHOLD",
    "MIN_STD",
    "STOP_GAMMAS",
    "STOP_BIAS_STRENGTHS",
    "OOD_FILE",
    "FEATURES",
    "intensity_summary",
    "site_reference",
    "site_metrics",
    "site_from_metrics",
    "build_record",
    "score",
    "assess",
    "expected_tissue_dice",
    "write_ood",
    "read_ood",
    "site_reference_from_dir",
]

QUANTILES: tuple[float, ...] = tuple(float(q) for q in np.round(np.linspace(0.05, 0.95, 19), 4))
FEATURES: tuple[str, ...] = tuple(f"q{q:.2f}" for q in QUANTILES) + ("block-std", "block-range")
THRESHOLD = 2.0
MIN_STD = 0.02  # floor of a feature's pooled standard deviation (few volumes per site)
BLOCKS = 4
# The "where instance norm stops" levels of the fairness report (server/report/invariance.py).
STOP_GAMMAS: tuple[float, ...] = (0.85, 0.7, 0.5, 0.35)
STOP_BIAS_STRENGTHS: tuple[float, ...] = (0.1, 0.2, 0.35, 0.5)
OOD_FILE = "ood.json"
_BINS = 256


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of ``values`` from a histogram spanning their range (so it moves with them)."""
    hist, edges = np.histogram(values, bins=_BINS)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist).astype(np.float64)
    total = weight[-1]
    mean = np.cumsum(hist * centres)
    w0, w1 = weight[:-1], total - weight[:-1]
    m0 = mean[:-1] / np.maximum(w0, 1)
    m1 = (mean[-1] - mean[:-1]) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:-1][int(np.argmax(between))])


def _block_medians(zf: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median of the bright foreground (above the foreground median) in each block of the foreground's box."""
    index = np.argwhere(mask)
    lo, hi = index.min(axis=0), index.max(axis=0) + 1
    bright = np.median(zf[mask])
    edges = [np.linspace(lo[a], hi[a], BLOCKS + 1).astype(int) for a in range(3)]
    out = []
    for i in range(BLOCKS):
        for j in range(BLOCKS):
            for k in range(BLOCKS):
                box = tuple(slice(edges[a][c], edges[a][c + 1]) for a, c in enumerate((i, j, k)))
                values = zf[box][mask[box]]
                values = values[values > bright]
                if values.size > 20:
                    out.append(np.median(values))
    return np.asarray(out if len(out) >= 2 else [0.0, 0.0])


def intensity_summary(image: np.ndarray) -> np.ndarray:
    """The features (:data:`FEATURES`) of one 3-D volume; see the module docstring.

    Invariant to ``s*x + b`` for any ``s > 0`` and ``b`` (up to float rounding); changed by
    non-linear curves and bias fields.

    Raises:
        ValueError: not 3-D, constant or non-finite.
    """
    x = np.asarray(image, dtype=np.float64)
    if x.ndim != 3 or x.size < 8 or not np.all(np.isfinite(x)):
        raise ValueError("intensity_summary needs a finite 3-D volume")
    std = x.std()
    if not std > 0:
        raise ValueError("intensity_summary needs a non-constant volume")
    z = (x - x.mean()) / std
    mask = z > _otsu(z.ravel())
    if mask.sum() < 2 or not z[mask].std() > 0:
        mask = np.ones_like(mask)
    fg = z[mask]
    zf = (z - fg.mean()) / fg.std()
    blocks = _block_medians(zf, mask)
    spread = [blocks.std(), np.percentile(blocks, 90) - np.percentile(blocks, 10)]
    return np.concatenate([np.quantile(zf[mask], QUANTILES), spread])


def _in_signal_range(image: np.ndarray, profile: ScannerProfile, rng: np.random.Generator | None) -> np.ndarray:
    """A scanner step (``shared.scanner``) applied in the volume's own range, as the fairness report does."""
    x = np.asarray(image, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return x
    signal = (x - lo) / (hi - lo) * REFERENCE_RANGE
    return lo + apply_scanner(signal, profile, rng).astype(np.float64) / REFERENCE_RANGE * (hi - lo)


def site_reference(
    images: Iterable[np.ndarray],
    gammas: Sequence[float] = STOP_GAMMAS,
    bias_strengths: Sequence[float] = STOP_BIAS_STRENGTHS,
    seed: int = 0,
) -> dict:
    """What one site shares about its training volumes: aggregates only.

    Args:
        images: the site's training volumes (each is read once; none is kept).
        gammas, bias_strengths: "where instance norm stops" levels to calibrate scores against.
        seed: seed of the bias fields.

    Returns:
        ``{"n", "mean", "ss", "stops"}``: volume count, mean feature vector, summed squared
        deviations from it per feature, and per stop level ``{"kind", "level", "mean"}``: the
        mean feature vector of the site's volumes under that gamma curve or bias field.
    """
    rng = np.random.default_rng(seed)
    levels = [("gamma", float(g)) for g in gammas] + [("bias", float(b)) for b in bias_strengths]
    features, perturbed = [], []
    for image in images:
        features.append(intensity_summary(image))
        row = []
        for kind, level in levels:
            profile = ScannerProfile(gamma=level) if kind == "gamma" else ScannerProfile(bias_strength=level)
            row.append(intensity_summary(_in_signal_range(image, profile, rng)))
        perturbed.append(row)
    if not features:
        raise ValueError("site_reference needs at least one volume")
    stack = np.stack(features)
    mean = stack.mean(axis=0)
    stops = [
        {"kind": kind, "level": level, "mean": [float(v) for v in np.mean([r[i] for r in perturbed], axis=0)]}
        for i, (kind, level) in enumerate(levels)
    ]
    return {
        "n": len(features),
        "mean": [float(v) for v in mean],
        "ss": [float(v) for v in ((stack - mean) ** 2).sum(axis=0)],
        "stops": stops,
    }


def site_metrics(reference: Mapping, prefix: str = "ood-") -> dict[str, int | float | list[float]]:
    """A site reference as numbers and lists of numbers (the value types of a Flower ``MetricRecord``)."""
    out: dict = {
        f"{prefix}n": int(reference["n"]),
        f"{prefix}mean": [float(v) for v in reference["mean"]],
        f"{prefix}ss": [float(v) for v in reference["ss"]],
    }
    for stop in reference["stops"]:
        out[f"{prefix}{stop['kind']}-{stop['level']:g}"] = [float(v) for v in stop["mean"]]
    return out


def site_from_metrics(metrics: Mapping, prefix: str = "ood-") -> dict | None:
    """Inverse of :func:`site_metrics`; None when the metrics carry no reference."""
    if f"{prefix}mean" not in metrics:
        return None
    stops = []
    for key, value in metrics.items():
        kind, _, level = key.removeprefix(prefix).partition("-")
        if key.startswith(prefix) and kind in ("gamma", "bias") and level:
            stops.append({"kind": kind, "level": float(level), "mean": [float(v) for v in value]})
    stops.sort(key=lambda s: (s["kind"] != "gamma", -s["level"] if s["kind"] == "gamma" else s["level"]))
    return {
        "n": int(metrics[f"{prefix}n"]),
        "mean": [float(v) for v in metrics[f"{prefix}mean"]],
        "ss": [float(v) for v in metrics[f"{prefix}ss"]],
        "stops": stops,
    }


def _pooled_std(sites: Mapping[str, Mapping]) -> np.ndarray:
    ss = np.sum([np.asarray(s["ss"], dtype=np.float64) for s in sites.values()], axis=0)
    dof = sum(int(s["n"]) - 1 for s in sites.values())
    std = np.sqrt(ss / dof) if dof > 0 else np.zeros_like(ss)
    return np.maximum(std, MIN_STD)


def _distance(features: Sequence[float], mean: Sequence[float], std: np.ndarray) -> float:
    """The larger of two RMS distances in pooled standard deviations: histogram shape, and block uniformity.

    Taken per group so that the two block features are not drowned by the 19 quantiles.
    """
    z = (np.asarray(features, dtype=np.float64) - np.asarray(mean, dtype=np.float64)) / std
    n = len(QUANTILES)
    return float(max(np.sqrt(np.mean(z[:n] ** 2)), np.sqrt(np.mean(z[n:] ** 2))))


def build_record(sites: Mapping[str, Mapping]) -> dict:
    """The registry record of a model: each site's reference, the pooled spread, the threshold and stop scores."""
    if not sites:
        raise ValueError("build_record needs at least one site reference")
    std = _pooled_std(sites)
    stops: dict[tuple[str, float], list[tuple[float, int]]] = {}
    for site in sites.values():
        for stop in site.get("stops", []):
            stops.setdefault((stop["kind"], float(stop["level"])), []).append(
                (_distance(stop["mean"], site["mean"], std), int(site["n"]))
            )
    return {
        "format": 1,
        "features": list(FEATURES),
        "sites": {name: dict(ref) for name, ref in sites.items()},
        "pooled_std": [float(v) for v in std],
        "threshold": THRESHOLD,
        "threshold_rule": "RMS distance to the nearest site's mean in pooled within-site standard deviations "
        f"(larger of histogram shape and block uniformity); warn above {THRESHOLD:g} "
        "(training scans lie near 1)",
        "stops": [
            {"kind": kind, "level": level, "score": sum(v * w for v, w in values) / sum(w for _, w in values)}
            for (kind, level), values in stops.items()
        ],
    }


def score(summary: Sequence[float], record: Mapping) -> tuple[float, str]:
    """``(distance to the nearest site's mean, that site)`` in pooled within-site standard deviations."""
    std = np.maximum(np.asarray(record["pooled_std"], dtype=np.float64), MIN_STD)
    distances = {name: _distance(summary, site["mean"], std) for name, site in record["sites"].items()}
    nearest = min(distances, key=distances.get)
    return distances[nearest], nearest


def expected_tissue_dice(value: float, nearest_site: str, record: Mapping, report: Mapping | None) -> float | None:
    """Tissue Dice to expect at this score, from the fairness report; None without a report.

    The report gives the nearest site's tissue Dice and, per "where instance norm stops" level,
    the agreement (Dice) of predictions on perturbed volumes with the unperturbed ones. The
    record gives each level's score (the sites' mean perturbed features scored against their own
    site, averaged over sites weighted by volume count). The expected
    agreement is interpolated over score (1 at score 0, flat beyond the strongest level); the
    expected tissue Dice is the site's tissue Dice times that agreement.
    """
    if not report:
        return None
    rows = {r.get("site"): r for r in report.get("sites", []) if isinstance(r, Mapping)}
    try:
        base = float(rows[nearest_site]["dice"]["tissue"]["mean"])
    except (KeyError, TypeError, ValueError):
        base = float(report.get("fairness_tissue", {}).get("mean", math.nan))
    agreements = {
        (s["kind"], round(float(s["level"]), 6)): s.get("dice_mean")
        for s in report.get("invariance", {}).get("stops", [])
    }
    points = [(0.0, 1.0)]
    for stop in record.get("stops", []):
        agreement = agreements.get((stop["kind"], round(float(stop["level"]), 6)))
        if agreement is not None and math.isfinite(agreement):
            points.append((float(stop["score"]), float(agreement)))
    if not math.isfinite(base):
        return None
    points.sort()
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ys = list(np.minimum.accumulate(ys))  # further out never predicts better
    return round(base * float(np.interp(value, xs, ys)), 4)


def assess(image: np.ndarray, record: Mapping, report: Mapping | None = None) -> dict:
    """The API's ``ood`` object for one volume: ``score, threshold, warning, nearest_site, expected_tissue_dice``."""
    value, nearest = score(intensity_summary(image), record)
    threshold = float(record["threshold"])
    return {
        "score": round(value, 4),
        "threshold": round(threshold, 4),
        "warning": bool(value > threshold),
        "nearest_site": nearest,
        "expected_tissue_dice": expected_tissue_dice(value, nearest, record, report),
    }


def write_ood(registry: str | Path, version: str, record: Mapping) -> Path:
    """Store the record beside the model's weights (``<registry>/<version>/ood.json``), atomically."""
    folder = Path(registry) / version
    if not folder.is_dir():
        raise FileNotFoundError(f"model version {version!r} not found in {registry}")
    path = folder / OOD_FILE
    tmp = path.with_name(f".{OOD_FILE}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_ood(registry: str | Path, version: str) -> dict | None:
    """The record of a model version, or None when it has none (older models, a failed write)."""
    path = Path(registry) / version / OOD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("sites") else None


def site_reference_from_dir(site_dir: str | Path, split: str = "train", **kwargs) -> dict:
    """:func:`site_reference` of a site folder's images (what ``client/task.py`` computes at its site)."""
    from shared.data import find_cases
    from shared.io import load_volume

    cases = find_cases(site_dir, split)
    return site_reference((load_volume(c["image"])[0] for c in cases), **kwargs)
