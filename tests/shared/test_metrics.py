"""Metrics that cannot flatter a failing model: worst-case HD95, lesion-wise detection, FP volume."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.metrics import lesion_detection, per_label_metrics, summarize_detection, worst_case_distance


def _blob(shape, centre, radius, label, out=None):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2
    out = np.zeros(shape, np.uint8) if out is None else out
    out[inside] = label
    return out


def test_hd95_of_a_missed_label_is_the_image_diagonal_not_nan():
    shape, spacing = (20, 24, 16), (2.0, 2.0, 3.0)
    truth = _blob(shape, (10, 12, 8), 6, 1)
    truth = _blob(shape, (5, 5, 5), 2, 3, truth)
    pred = np.where(truth == 3, 0, truth)  # lesion missed entirely
    hd = per_label_metrics(pred, truth, hd95=True, spacing=spacing)["hd95"]
    diagonal = worst_case_distance(shape, spacing)
    assert diagonal == pytest.approx(math.sqrt(40 ** 2 + 48 ** 2 + 48 ** 2))
    assert hd[3] == pytest.approx(diagonal)
    assert hd[1] == pytest.approx(0.0)
    assert math.isnan(hd[2])  # neither has white matter: nothing to measure
    # a hallucinated label (empty reference, non-empty prediction) is also the worst case
    ghost = _blob(shape, (15, 18, 10), 2, 2, pred.copy())
    assert per_label_metrics(ghost, truth, hd95=True, spacing=spacing)["hd95"][2] == pytest.approx(diagonal)


def test_lesion_detection_counts_components():
    shape = (40, 40, 40)
    truth = _blob(shape, (10, 10, 10), 3, 3)
    truth = _blob(shape, (30, 30, 30), 3, 3, truth)  # two reference lesions
    pred = _blob(shape, (10, 10, 11), 3, 3)  # finds the first one
    pred = _blob(shape, (10, 30, 10), 2, 3, pred)  # and one false positive
    found = lesion_detection(pred, truth, spacing=(2.0, 2.0, 2.0))
    assert (found["ref_lesions"], found["pred_lesions"], found["detected"], found["true_pred"]) == (2, 2, 1, 1)
    fp_voxels = int((_blob(shape, (10, 30, 10), 2, 3) == 3).sum())
    assert found["fp_volume_ml"] == pytest.approx(fp_voxels * 8 / 1000)
    summary = summarize_detection([found])
    assert summary["precision"] == pytest.approx(0.5) and summary["recall"] == pytest.approx(0.5)
    assert summary["f1"] == pytest.approx(0.5)


def test_detection_summary_counts_false_positives_on_lesion_free_cases():
    shape = (30, 30, 30)
    lesion_case = lesion_detection(_blob(shape, (10, 10, 10), 3, 3), _blob(shape, (10, 10, 10), 3, 3))
    clean_truth = np.zeros(shape, np.uint8)
    ghost = lesion_detection(_blob(shape, (20, 20, 20), 2, 3), clean_truth, spacing=(1.0, 1.0, 2.0))
    silent = lesion_detection(clean_truth, clean_truth)
    summary = summarize_detection([lesion_case, ghost, silent])
    assert summary["n_lesion_free"] == 2 and summary["fp_cases_lesion_free"] == 1
    assert summary["fp_volume_ml_lesion_free"] == pytest.approx(ghost["pred_volume_ml"] / 2)
    assert summary["precision"] == pytest.approx(0.5) and summary["recall"] == 1.0


def test_a_model_that_never_predicts_lesions_scores_zero_not_perfect():
    shape = (20, 20, 20)
    truth = _blob(shape, (10, 10, 10), 3, 3)
    summary = summarize_detection([lesion_detection(np.zeros(shape, np.uint8), truth)])
    assert summary["recall"] == 0.0 and summary["f1"] == 0.0 and math.isnan(summary["precision"])
