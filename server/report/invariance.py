"""The invariance certificate: does the prediction survive a scanner's intensity mapping?

``affine_invariance`` applies K random maps ``x -> s*x + b`` (s log-uniform in [0.2, 5],
b uniform in [-1000, 1000]) to a volume's raw intensities and compares the label maps.
Instance norm cancels these exactly (up to eps), BatchNorm at inference does not.

``where_in_stops`` runs the same comparison for the perturbations IN does not cancel: a
non-linear gamma curve and a smooth multiplicative bias field, at increasing strength. Both
come from ``shared.scanner`` (the same code that simulates the demo hospitals), applied to
the volume rescaled to the scanner's signal range [0, REFERENCE_RANGE] and mapped back, so
only the non-linear part changes.

A ``predict`` callable maps a raw ``(X, Y, Z)`` float volume to a label map; the caller
decides what preprocessing (e.g. z-scoring) sits between the raw intensities and the net.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from shared.metrics import agreement_dice
from shared.scanner import REFERENCE_RANGE, ScannerProfile, apply_scanner

__all__ = [
    "SCALE_RANGE",
    "SHIFT_RANGE",
    "DEFAULT_GAMMAS",
    "DEFAULT_BIAS_STRENGTHS",
    "AffineMap",
    "random_affine_maps",
    "agreement_dice",
    "perturb_gamma",
    "perturb_bias",
    "affine_invariance",
    "where_in_stops",
    "summarize_checks",
]

SCALE_RANGE = (0.2, 5.0)
SHIFT_RANGE = (-1000.0, 1000.0)
# Gamma 1 and bias 0 are the identity; further from them is a stronger non-linear change.
DEFAULT_GAMMAS = (0.85, 0.7, 0.5, 0.35)
DEFAULT_BIAS_STRENGTHS = (0.1, 0.2, 0.35, 0.5)

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class AffineMap:
    """One scanner-like intensity map ``x -> scale * x + shift``."""

    scale: float
    shift: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (self.scale * np.asarray(x, dtype=np.float64) + self.shift).astype(np.float32)


def random_affine_maps(
    k: int,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = SCALE_RANGE,
    shift_range: tuple[float, float] = SHIFT_RANGE,
) -> list[AffineMap]:
    """``k`` maps with ``s`` log-uniform in ``scale_range`` (as likely x0.5 as x2) and ``b`` uniform."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    scales = np.exp(rng.uniform(np.log(lo), np.log(hi), size=k))
    shifts = rng.uniform(shift_range[0], shift_range[1], size=k)
    return [AffineMap(float(s), float(b)) for s, b in zip(scales, shifts)]


def _in_signal_range(image: np.ndarray, apply) -> np.ndarray:
    """Rescale to [0, REFERENCE_RANGE], apply a scanner step, map back to the original range."""
    x = np.asarray(image, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.asarray(image, dtype=np.float32)
    signal = (x - lo) / (hi - lo) * REFERENCE_RANGE
    return (lo + apply(signal).astype(np.float64) / REFERENCE_RANGE * (hi - lo)).astype(np.float32)


def perturb_gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """The volume through ``shared.scanner``'s gamma curve (in its own intensity range)."""
    profile = ScannerProfile(gamma=gamma)
    return _in_signal_range(image, lambda s: apply_scanner(s, profile))


def perturb_bias(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """The volume times ``shared.scanner``'s smooth bias field of peak amplitude ``strength``."""
    profile = ScannerProfile(bias_strength=strength)
    return _in_signal_range(image, lambda s: apply_scanner(s, profile, rng))


def affine_invariance(
    predict: Predict, image: np.ndarray, maps: Sequence[AffineMap], reference: np.ndarray | None = None
) -> list[dict]:
    """Compare ``predict(image)`` with ``predict(map(image))`` for every map.

    Returns one record per map: ``scale``, ``shift``, ``dice`` (:func:`agreement_dice`) and
    ``voxel_agreement`` (share of identical labels).
    """
    ref = predict(image) if reference is None else reference
    out = []
    for m in maps:
        pred = predict(m(image))
        out.append(
            {
                "scale": m.scale,
                "shift": m.shift,
                "dice": agreement_dice(ref, pred),
                "voxel_agreement": float((pred == ref).mean()),
            }
        )
    return out


def where_in_stops(
    predict: Predict,
    image: np.ndarray,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    bias_strengths: Sequence[float] = DEFAULT_BIAS_STRENGTHS,
    rng: np.random.Generator | None = None,
    reference: np.ndarray | None = None,
) -> list[dict]:
    """Agreement under gamma curves and bias fields; one record per ``(kind, level)``."""
    rng = rng or np.random.default_rng(0)
    ref = predict(image) if reference is None else reference
    perturbed = [("gamma", g, lambda x, g=g: perturb_gamma(x, g)) for g in gammas]
    perturbed += [("bias", s, lambda x, s=s: perturb_bias(x, s, rng)) for s in bias_strengths]
    out = []
    for kind, level, perturb in perturbed:
        pred = predict(perturb(image))
        out.append(
            {
                "kind": kind,
                "level": float(level),
                "dice": agreement_dice(ref, pred),
                "voxel_agreement": float((pred == ref).mean()),
            }
        )
    return out


def summarize_checks(records: Sequence[dict], key: str = "dice") -> dict[str, float]:
    """``{"min", "mean", "n"}`` of ``key`` over records (NaN when there are none)."""
    values = [r[key] for r in records if r.get(key) is not None and math.isfinite(r[key])]
    if not values:
        return {"min": math.nan, "mean": math.nan, "n": 0}
    return {"min": float(min(values)), "mean": float(np.mean(values)), "n": len(values)}
