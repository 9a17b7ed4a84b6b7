"""DICOM at the API: a zipped MR series in, a DICOM Segmentation out.

``open_upload`` (``upload.py``) hands a zip here (by its magic bytes); the series becomes the
same ``(array, meta)`` a NIfTI upload gives (``shared.dicom``), plus ``meta["dicom"]``: the
sorted source headers, without pixel data, that a SEG references. The limits are the NIfTI
ones: the upload's byte limit while it streams, then ``max_voxels`` bounds the zip's declared
uncompressed size and the series' size before any entry is inflated or pixel decoded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import Query, Response

from shared.dicom import ZipLimits, build_segmentation, read_series_zip, segmentation_to_bytes
from shared.errors import InvalidVolumeError

__all__ = ["SEG_MEDIA_TYPE", "OutputFormat", "open_dicom_upload", "encode_dicom_seg", "dicom_seg_response"]

SEG_MEDIA_TYPE = "application/dicom"
SOURCE = "upload"


def open_dicom_upload(
    raw: Path, work_dir: Path, max_voxels: int, check_grid: Callable | None = None
) -> tuple[np.ndarray, dict]:
    """Validate and read a zipped DICOM series as ``(array, meta)``; the zip is deleted after reading.

    ``check_grid(shape, affine)`` (the API's work budget) sees the series' grid before any pixel is decoded.
    """
    try:
        return read_series_zip(raw, SOURCE, ZipLimits(max_voxels=max_voxels), check_grid)
    finally:
        raw.unlink(missing_ok=True)


def encode_dicom_seg(labels: np.ndarray, meta: dict, model_version: str) -> bytes:
    """The label map as a DICOM SEG (Part 10 bytes) referencing the uploaded series.

    Raises:
        InvalidVolumeError: the upload was not a DICOM series (a SEG needs source instances).
    """
    datasets = meta.get("dicom")
    if not datasets:
        raise InvalidVolumeError(
            f"{SOURCE}: format=dicom-seg needs a DICOM series (a zip of its files); "
            "a NIfTI upload has no DICOM instances to reference"
        )
    return segmentation_to_bytes(build_segmentation(labels, datasets, model_version))


# ``?format=`` of POST /v1/segment.
OutputFormat = Annotated[
    Literal["nifti", "dicom-seg"],
    Query(
        alias="format",
        description="nifti: label map .nii.gz; dicom-seg: a DICOM Segmentation of an uploaded DICOM series",
    ),
]


def dicom_seg_response(seg, server_timing: str, extra_headers: dict[str, str] | None = None) -> Response:
    """The HTTP response of ``?format=dicom-seg``: the SEG file (blocking; run it in a worker thread)."""
    start = time.perf_counter()
    content = encode_dicom_seg(seg.labels, seg.meta, seg.model.version)
    timing = f"{server_timing}, dicom-seg;dur={(time.perf_counter() - start) * 1000:.1f}"
    return Response(
        content=content,
        media_type=SEG_MEDIA_TYPE,
        headers={
            "Content-Disposition": 'attachment; filename="segmentation.dcm"',
            "X-Model-Version": seg.model.version,
            "Server-Timing": timing,
            **(extra_headers or {}),
        },
    )
