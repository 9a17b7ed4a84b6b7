"""Response models of the API (they are also its OpenAPI schema)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["ErrorResponse", "Health", "Ready", "ModelInfo", "ModelList", "LabelVolume", "InputSummary",
           "Timings", "SlicePreview", "Preview", "OodSummary", "SegmentSummary", "finite_metrics"]


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: what went wrong, in one sentence; a refused work limit also names it."""

    detail: str
    limit: str | None = Field(default=None,
                              description="the setting whose limit was exceeded, e.g. FEDMRI_MAX_MODEL_VOXELS")
    value: float | None = Field(default=None, description="the request's amount of what the limit bounds")
    maximum: int | None = Field(default=None, description="the limit")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    model_version: str


class ModelInfo(BaseModel):
    """One registered model version, from its ``meta.json``."""

    version: str
    created: str | None = None
    served: bool = Field(description="the version answering requests that name no model")
    loaded: bool = Field(description="in memory now (others load on first request)")
    kind: str | None = None
    strategy: str | None = None
    norm: str | None = None
    round: int | None = Field(default=None, description="federated round the weights come from")
    fedbn: bool | None = Field(default=None, description="normalisation layers kept local (FedBN)")
    run_name: str | None = None
    sites: list[str] = Field(default_factory=list, description="sites whose data trained these weights")
    missing_sites: list[str] = Field(default_factory=list, description="expected sites that did not contribute")
    spacing_mm: list[float] = Field(default_factory=list, description="voxel size the model works at")
    roi_size: list[int] = Field(default_factory=list, description="sliding-window size in voxels")
    metrics: dict[str, dict[str, float | None]] = Field(
        default_factory=dict,
        description="per-site metrics from meta.json, flattened: e.g. {'hospital-a': {'eval.dice_mean': 0.8}}",
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


class LabelVolume(BaseModel):
    label: int
    name: str
    voxels: int
    ml: float = Field(description="volume in millilitres, from the input's voxel size")


class InputSummary(BaseModel):
    shape: list[int]
    spacing_mm: list[float]
    orientation: str = Field(description="axis codes of the input's voxel axes, e.g. 'LAS'")
    nifti_version: int
    qform_code: int
    sform_code: int


class Timings(BaseModel):
    """Seconds spent in each stage of the request."""

    upload_s: float
    read_s: float
    preprocess_s: float
    inference_s: float
    postprocess_s: float
    total_s: float


class SlicePreview(BaseModel):
    """One orthogonal slice (RAS display orientation), uint8 rows top-down, base64-encoded."""

    plane: Literal["sagittal", "coronal", "axial"]
    index: int
    width: int
    height: int
    pixel_mm: list[float]
    image: str
    labels: str


class Preview(BaseModel):
    slices: list[SlicePreview]
    segmentation_nii_gz: str = Field(description="the label map as base64 .nii.gz, as POST /v1/segment returns it")


class OodSummary(BaseModel):
    """How far the upload's intensity summary lies from every training site's (``shared.ood``)."""

    score: float = Field(description="distance to the nearest training site, in pooled within-site standard deviations")
    threshold: float = Field(description="scores above this get a warning (training scans lie near 1)")
    warning: bool = Field(description="score > threshold: unlike every training scanner; the segmentation may be worse")
    nearest_site: str
    expected_tissue_dice: float | None = Field(
        default=None,
        description="grey/white matter Dice to expect, from the fairness report's 'where instance norm stops' table")


class SegmentSummary(BaseModel):
    model_version: str
    labels: list[LabelVolume]
    volumes_ml: dict[str, float] = Field(description="label name -> volume in mL")
    input: InputSummary
    timings: Timings
    warnings: list[str] = Field(
        default_factory=list,
        description="header fields that were invalid and recovered (e.g. a broken qform replaced by the sform)")
    ood: OodSummary | None = Field(default=None,
                                   description="out-of-distribution check; null when the model has no ood.json")
    preview: Preview | None = None


def _flat_numbers(values: dict, prefix: str = "") -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "node_id":
            out[name] = float(value) if math.isfinite(value) else None
    return out


def finite_metrics(metrics: object) -> dict[str, dict[str, float | None]]:
    """Per-site numbers as flat dicts (``{"eval": {"dice_mean": x}}`` -> ``{"eval.dice_mean": x}``).

    Non-finite values become ``None`` (JSON has no NaN); anything not a number is dropped.
    """
    if not isinstance(metrics, dict):
        return {}
    return {str(site): _flat_numbers(values) for site, values in metrics.items() if isinstance(values, dict)}
