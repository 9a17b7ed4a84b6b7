"""Evaluate one model on every site's held-out test cases (``imagesTs/ labelsTs/``).

Per case: Dice and HD95 per label and lesion-wise detection (``shared.metrics``), computed on
the case's own label grid (the label file's voxels: class probabilities are resampled there,
``shared.resample``), the predicted label map on that grid (optionally saved as NIfTI), the
affine-invariance checks and the "where IN stops" checks (on the model's grid). Per site: a
subsample of raw intensities for the histogram, one example slice and the pooled lesion
detection (precision, recall, F1, false-positive lesion volume on lesion-free cases).

A site whose test files cannot be read is returned in ``skipped`` with the error naming the
file; the other sites are still evaluated.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from server.report.invariance import (
    DEFAULT_BIAS_STRENGTHS,
    DEFAULT_GAMMAS,
    affine_invariance,
    random_affine_maps,
    where_in_stops,
)
from shared.data import DataConfig, find_cases, make_eval_dataset, validate_cases
from shared.errors import InvalidSiteError, InvalidVolumeError
from shared.io import load_volume, save_segmentation
from shared.metrics import summarize_detection
from shared.training import discover_sites, native_case_metrics, predict_labels, predict_probabilities

__all__ = ["SiteEvaluation", "make_predictor", "evaluate_site", "evaluate_sites"]

log = logging.getLogger(__name__)

# Every n-th voxel goes into the intensity histogram: plenty for 100 bins, small in memory.
HISTOGRAM_STRIDE = 7


@dataclass
class SiteEvaluation:
    """Everything measured on one site's test cases."""

    site: str
    cases: list[dict]
    affine_checks: list[dict] = field(default_factory=list)
    stop_checks: list[dict] = field(default_factory=list)
    intensities: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    example: dict | None = None
    detection: dict = field(default_factory=dict)


def make_predictor(model: torch.nn.Module, cfg: DataConfig):
    """``predict(raw (X, Y, Z) volume) -> label map``, z-scoring first when the model was trained so."""
    from monai.transforms import NormalizeIntensity

    normalize = NormalizeIntensity() if cfg.zscore else None

    def predict(volume: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(volume, dtype=np.float32)[None])
        if normalize is not None:
            x = torch.as_tensor(normalize(x))
        return predict_labels(model, x, cfg.roi_size).numpy()

    return predict


def make_probability_predictor(model: torch.nn.Module, cfg: DataConfig):
    """``predict(raw (X, Y, Z) volume) -> (classes, X, Y, Z)`` softmax probabilities (z-scored first if so trained)."""
    from monai.transforms import NormalizeIntensity

    normalize = NormalizeIntensity() if cfg.zscore else None

    def predict(volume: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(volume, dtype=np.float32)[None])
        if normalize is not None:
            x = torch.as_tensor(normalize(x))
        return predict_probabilities(model, x, cfg.roi_size)

    return predict


def _check_readable(cases: list[dict]) -> None:
    """Read every voxel once (headers, data, finiteness) so a bad file fails before any inference."""
    validate_cases(cases)
    for case in cases:
        for key in ("image", "label"):
            try:
                load_volume(case[key], source=case[key])
            except InvalidVolumeError as exc:
                raise InvalidSiteError(str(exc)) from None


def _example_slice(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> dict:
    """The axial slice with the most labelled tissue."""
    z = int(np.argmax((truth > 0).sum(axis=(0, 1))))
    return {"image": image[:, :, z], "truth": truth[:, :, z], "pred": pred[:, :, z], "slice": z}


def evaluate_site(
    model: torch.nn.Module,
    site_dir: str | Path,
    cfg: DataConfig,
    k: int = 5,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    bias_strengths: Sequence[float] = DEFAULT_BIAS_STRENGTHS,
    seed: int = 0,
    hd95: bool = True,
    predictions_dir: str | Path | None = None,
) -> SiteEvaluation:
    """Evaluate ``model`` on one site's test split.

    Args:
        model: network in eval mode.
        site_dir: site folder with ``imagesTs/`` and ``labelsTs/``.
        cfg: the model's data config (spacing, ROI, z-scoring).
        k: random affine maps per test volume (0 skips the invariance check).
        gammas, bias_strengths: "where IN stops" levels (empty skips them).
        seed: seeds the affine maps and bias fields (per site and case, so sites are independent).
        hd95: also compute the 95th-percentile Hausdorff distance.
        predictions_dir: if given, predicted label maps are written there as
            ``<site>/<case>.nii.gz`` on the label file's grid, with its affine and qform/sform
            codes (recorded as ``predictions/<site>/<case>.nii.gz``, relative to the report folder).

    Raises:
        InvalidSiteError: a test file is missing, unpaired or unreadable (the message names it).
    """
    site_dir = Path(site_dir)
    cases = find_cases(site_dir, "test")
    _check_readable(cases)
    raw_cfg = dataclasses.replace(cfg, zscore=False, cache=False)  # perturb raw intensities, z-score after
    predict = make_predictor(model, cfg)
    probabilities = make_probability_predictor(model, cfg)
    site_key = zlib.crc32(site_dir.name.encode())
    result = SiteEvaluation(site_dir.name, [])
    samples = []
    dataset = make_eval_dataset(cases, raw_cfg)
    for index, case in enumerate(cases):
        try:
            item = dataset[index]
        except Exception as exc:  # MONAI wraps reader errors in RuntimeError
            raise InvalidSiteError(f"{case['image']}: could not be preprocessed ({type(exc).__name__})") from None
        image = np.asarray(item["image"][0], dtype=np.float32)
        truth = np.asarray(item["label"][0]).astype(np.uint8)
        probs = probabilities(image)
        pred = probs.argmax(0).numpy().astype(np.uint8)  # model grid: invariance checks and example slice
        affine = np.asarray(getattr(item["image"], "affine", np.eye(4)), dtype=np.float64)
        metrics = native_case_metrics(probs, affine, case["label"], hd95=hd95)  # on the label file's grid
        record = {"name": case["name"], "dice": metrics["dice"], "hd95": metrics["hd95"], "lesion": metrics["lesion"]}
        if predictions_dir is not None:
            out = Path(predictions_dir) / site_dir.name / f"{case['name']}.nii.gz"
            out.parent.mkdir(parents=True, exist_ok=True)
            save_segmentation(metrics["prediction"], out, metrics["meta"])
            record["prediction"] = f"predictions/{site_dir.name}/{case['name']}.nii.gz"  # relative to the report
        result.cases.append(record)
        samples.append(image.ravel()[::HISTOGRAM_STRIDE])
        if result.example is None:
            result.example = _example_slice(image, truth, pred)

        rng = np.random.default_rng([seed, site_key, index])
        if k > 0:
            for check in affine_invariance(predict, image, random_affine_maps(k, rng), reference=pred):
                result.affine_checks.append({"case": case["name"], **check})
        if gammas or bias_strengths:
            for check in where_in_stops(predict, image, gammas, bias_strengths, rng=rng, reference=pred):
                result.stop_checks.append({"case": case["name"], **check})
    result.intensities = np.concatenate(samples) if samples else result.intensities
    result.detection = summarize_detection([c["lesion"] for c in result.cases])
    return result


def evaluate_sites(
    model: torch.nn.Module,
    data_dir: str | Path,
    cfg: DataConfig,
    sites: Sequence[str] | None = None,
    **kwargs,
) -> tuple[list[SiteEvaluation], list[dict]]:
    """Evaluate every site under ``data_dir`` (or the named ``sites``).

    Returns ``(evaluations, skipped)``; ``skipped`` holds ``{"site", "error"}`` for each site
    that could not be evaluated, with the error naming the bad file.
    """
    evaluations, skipped = [], []
    for site_dir in discover_sites(data_dir, list(sites) if sites else None):
        try:
            evaluations.append(evaluate_site(model, site_dir, cfg, **kwargs))
        except (InvalidSiteError, InvalidVolumeError) as exc:
            log.warning("site %s skipped: %s", site_dir.name, exc)
            skipped.append({"site": site_dir.name, "error": str(exc)})
    return evaluations, skipped
