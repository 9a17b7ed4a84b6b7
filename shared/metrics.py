"""Segmentation metrics that cannot flatter a failing model (Metrics Reloaded conventions).

- Dice per label (MONAI); a label absent from the reference gets NaN (averages run over the
  cases that have it) - its false positives are counted by the detection metrics instead.
- HD95 per label in mm (MONAI); when exactly one of prediction and reference is empty the value
  is the stated worst case, the image diagonal in mm (``worst_case_distance``), never NaN.
- Lesion-wise detection over connected components (:func:`lesion_detection`): precision,
  recall and F1 of lesions, and the false-positive lesion volume on lesion-free cases
  (:func:`summarize_detection`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from shared.labels import NUM_CLASSES

__all__ = [
    "per_label_metrics",
    "agreement_dice",
    "prediction_agreement",
    "nanmean",
    "worst_case_distance",
    "lesion_detection",
    "summarize_detection",
    "LESION_LABEL",
]

LESION_LABEL = 3


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    from monai.networks.utils import one_hot

    labels = torch.as_tensor(labels)
    while labels.ndim < 5:
        labels = labels.unsqueeze(0)
    return one_hot(labels.long(), num_classes=num_classes, dim=1)


def per_label_metrics(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    num_classes: int = NUM_CLASSES,
    hd95: bool = False,
    spacing: tuple[float, ...] | None = None,
) -> dict[str, dict[int, float]]:
    """Dice (and optionally HD95 in mm) for each foreground label of one case.

    A label absent from ``truth`` gets NaN Dice (MONAI ``ignore_empty``): Dice is undefined
    there, and false positives on such cases are counted by :func:`lesion_detection`.
    HD95: both empty gives NaN (nothing to measure); exactly one empty gives the worst case,
    the image diagonal in mm (:func:`worst_case_distance`), so a missed label is never skipped.
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    p, t = _one_hot(pred, num_classes), _one_hot(truth, num_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, t)[0]
    out: dict[str, dict[int, float]] = {"dice": {k: float(dice[k - 1]) for k in range(1, num_classes)}}
    if hd95:
        worst = worst_case_distance(tuple(t.shape[2:]), spacing)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns for every empty label
            hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
                p, t, spacing=list(spacing) if spacing is not None else None
            )[0]
        values = {}
        for k in range(1, num_classes):
            in_truth, in_pred = bool(t[0, k].any()), bool(p[0, k].any())
            v = float(hd[k - 1])
            if not in_truth and not in_pred:
                values[k] = float("nan")
            elif in_truth != in_pred or not np.isfinite(v):
                values[k] = worst
            else:
                values[k] = min(v, worst)
        out["hd95"] = values
    return out


def worst_case_distance(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """The image diagonal in mm (voxels times spacing): the HD95 of a label missed entirely."""
    size = np.asarray(shape, dtype=np.float64) * (np.asarray(spacing, dtype=np.float64) if spacing is not None else 1.0)
    return float(np.linalg.norm(size))


def lesion_detection(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    label: int = LESION_LABEL,
    spacing: Sequence[float] | None = None,
) -> dict[str, float]:
    """Lesion-wise detection on one case: connected components (26-connectivity) of ``label``.

    A reference lesion is detected when any predicted lesion voxel touches it; a predicted lesion
    is a true positive when it touches any reference lesion. Returns counts (so cases can be
    pooled) and volumes in mL: ``ref_lesions, pred_lesions, detected, true_pred, fp_lesions,
    pred_volume_ml, fp_volume_ml`` (predicted lesion volume outside any reference lesion's component).
    """
    from scipy import ndimage

    p = np.asarray(torch.as_tensor(pred).cpu()) == label
    t = np.asarray(torch.as_tensor(truth).cpu()) == label
    if p.shape != t.shape:
        raise ValueError(f"prediction and reference differ in shape: {p.shape} vs {t.shape}")
    structure = np.ones((3,) * p.ndim, dtype=bool)
    ref_cc, n_ref = ndimage.label(t, structure)
    pred_cc, n_pred = ndimage.label(p, structure)
    detected = len(np.setdiff1d(np.unique(ref_cc[p]), [0]))
    hit = np.setdiff1d(np.unique(pred_cc[t]), [0])
    voxel_ml = float(np.prod(spacing)) / 1000.0 if spacing is not None else 0.001
    fp_voxels = int(p.sum()) - (int(np.isin(pred_cc, hit).sum()) if len(hit) else 0)
    return {
        "ref_lesions": int(n_ref),
        "pred_lesions": int(n_pred),
        "detected": int(detected),
        "true_pred": int(len(hit)),
        "fp_lesions": int(n_pred - len(hit)),
        "pred_volume_ml": float(p.sum()) * voxel_ml,
        "fp_volume_ml": fp_voxels * voxel_ml,
    }


def summarize_detection(records: Sequence[dict]) -> dict[str, float]:
    """Pool :func:`lesion_detection` records of many cases (counts summed, Metrics Reloaded style).

    Returns ``precision`` (true predicted lesions / predicted lesions), ``recall`` (detected
    reference lesions / reference lesions), ``f1``, the counts, and ``fp_volume_ml_lesion_free``:
    mean predicted lesion volume on cases without any reference lesion (with
    ``n_lesion_free`` such cases; NaN when there is none). A model that predicts no lesion at
    all gets recall 0 where lesions exist and precision NaN (nothing predicted), never 1.
    """
    ref = sum(r["ref_lesions"] for r in records)
    pred = sum(r["pred_lesions"] for r in records)
    detected = sum(r["detected"] for r in records)
    true_pred = sum(r["true_pred"] for r in records)
    precision = true_pred / pred if pred else float("nan")
    recall = detected / ref if ref else float("nan")
    if np.isfinite(precision) and np.isfinite(recall):
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    else:
        f1 = 0.0 if ref and not pred else float("nan")
    free = [r["pred_volume_ml"] for r in records if r["ref_lesions"] == 0]
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "ref_lesions": int(ref),
        "pred_lesions": int(pred),
        "detected": int(detected),
        "fp_lesions": int(pred - true_pred),
        "n_cases": len(records),
        "n_lesion_free": len(free),
        "fp_volume_ml_lesion_free": float(np.mean(free)) if free else float("nan"),
        "fp_cases_lesion_free": int(sum(v > 0 for v in free)),
    }


def agreement_dice(pred_a: np.ndarray, pred_b: np.ndarray, labels: Sequence[int] = (1, 2, 3)) -> float:
    """Mean Dice between two label maps over the labels present in either of them.

    Unlike a ground-truth Dice, a label predicted in only one map counts as 0 (not ignored),
    and two maps with no foreground at all agree perfectly (1.0).
    """
    a, b = np.asarray(pred_a), np.asarray(pred_b)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    scores = []
    for label in labels:
        in_a, in_b = a == label, b == label
        total = int(in_a.sum()) + int(in_b.sum())
        if total:
            scores.append(2.0 * int((in_a & in_b).sum()) / total)
    return float(np.mean(scores)) if scores else 1.0


def prediction_agreement(pred_a: np.ndarray | torch.Tensor, pred_b: np.ndarray | torch.Tensor) -> dict[str, float]:
    """How much two label maps agree: share of identical voxels and :func:`agreement_dice`."""
    a, b = np.asarray(pred_a), np.asarray(pred_b)
    return {"voxel_agreement": float((a == b).mean()), "dice": agreement_dice(a, b)}


def nanmean(values) -> float:
    arr = np.asarray(list(values), dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
