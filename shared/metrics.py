"""Segmentation metrics (MONAI's Dice and 95th-percentile Hausdorff distance), per label."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from shared.synth import LABELS

__all__ = ["FOREGROUND_LABELS", "per_label_metrics", "agreement_dice", "prediction_agreement", "nanmean"]

FOREGROUND_LABELS = tuple(k for k in LABELS if k != 0)


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    from monai.networks.utils import one_hot

    labels = torch.as_tensor(labels)
    while labels.ndim < 5:
        labels = labels.unsqueeze(0)
    return one_hot(labels.long(), num_classes=num_classes, dim=1)


def per_label_metrics(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    num_classes: int = 4,
    hd95: bool = False,
    spacing: tuple[float, ...] | None = None,
) -> dict[str, dict[int, float]]:
    """Dice (and optionally HD95 in mm) for each foreground label of one case.

    A label absent from ``truth`` gets NaN Dice (MONAI ``ignore_empty``), so averages skip it
    instead of rewarding or punishing an empty prediction.
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    p, t = _one_hot(pred, num_classes), _one_hot(truth, num_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, t)[0]
    out: dict[str, dict[int, float]] = {"dice": {k: float(dice[k - 1]) for k in range(1, num_classes)}}
    if hd95:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns for every empty label
            hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
                p, t, spacing=list(spacing) if spacing is not None else None
            )[0]
        values = {}
        for k in range(1, num_classes):
            v = float(hd[k - 1])
            empty = not bool(t[0, k].any()) or not bool(p[0, k].any())
            values[k] = float("nan") if (empty or not np.isfinite(v)) else v
        out["hd95"] = values
    return out


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
