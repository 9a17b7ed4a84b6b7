"""Segmentation of uploaded volumes: the label map as ``.nii.gz``, or a JSON summary."""

from __future__ import annotations

import base64
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated

import anyio
import torch
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from server.api.budget import QueueFullError, WorkBudget
from server.api.config import ApiSettings
from server.api.deps import ModelStoreDep, SettingsDep, require_api_key
from server.api.dicom_upload import OutputFormat, dicom_seg_response
from server.api.inference import (
    ModelLoadError,
    ModelNotFoundError,
    ModelStore,
    Segmentation,
    ServedModel,
    encode_segmentation,
    input_summary,
    label_volumes,
    preview_slices,
    segment_volume,
)
from server.api.memory import HeapTrimmer
from server.api.ood import assess_upload, ood_headers
from server.api.schemas import ErrorResponse, SegmentSummary
from server.api.upload import UPLOAD_FIELD, Received, header_check, inspect_upload, open_upload, receive_upload

log = logging.getLogger("fedmri.api")

router = APIRouter(
    prefix="/v1/segment",
    tags=["segment"],
    dependencies=[Depends(require_api_key)],
    responses={
        400: {"model": ErrorResponse, "description": "malformed multipart body"},
        401: {"model": ErrorResponse, "description": "API key missing or wrong"},
        404: {"model": ErrorResponse, "description": "unknown model version"},
        413: {"model": ErrorResponse, "description": "upload larger than FEDMRI_MAX_UPLOAD_BYTES"},
        415: {"model": ErrorResponse, "description": "not a multipart/form-data request"},
        422: {"model": ErrorResponse, "description": "not a usable NIfTI volume (the detail says why)"},
        503: {"model": ErrorResponse, "description": "no model loaded, the requested one cannot be loaded, "
                                                      "or too many requests in flight (Retry-After)"},
    },
)

# The body is parsed by hand while it streams, so describe it for /docs.
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [UPLOAD_FIELD],
                    "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary",
                                                  "description": "a 3-D .nii or .nii.gz (NIfTI-1 or -2)"}},
                }
            }
        },
    }
}

ModelVersion = Annotated[
    str | None,
    Query(alias="model", max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
          description="registered model version (default: the served one); see GET /v1/models"),
]


@dataclass
class _Outcome:
    seg: Segmentation
    nifti: bytes | None
    preview: list[dict] | None
    timings: dict[str, float]


def _resolve(store: ModelStore, version: str | None) -> ServedModel:
    try:
        return store.get(version)
    except ModelLoadError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    except ModelNotFoundError as exc:
        code = status.HTTP_404_NOT_FOUND if version is not None else status.HTTP_503_SERVICE_UNAVAILABLE
        detail = str(exc) if version is not None else f"no model loaded: {store.error or exc}"
        raise HTTPException(code, detail) from None


def _process(received: Received, work_dir: Path, model: ServedModel, settings: ApiSettings, trimmer: HeapTrimmer,
             nifti: bool, preview: bool) -> _Outcome:
    """Blocking part of a request (runs in a worker thread): read, segment, encode."""
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)  # OpenMP's thread count is per calling thread
    start = time.perf_counter()
    try:
        image, meta = open_upload(received.raw, work_dir, settings.max_voxels, _grid_check(settings, model),
                                  inflated=received.inflated)
        read_s = time.perf_counter() - start
        seg = segment_volume(model, image, meta, overlap=settings.sw_overlap, sw_batch_size=settings.sw_batch_size,
                             precision=settings.inference_precision, device=settings.device)
        start = time.perf_counter()
        encoded = encode_segmentation(seg, work_dir) if nifti else None
        slices = preview_slices(seg) if preview else None
    finally:
        trimmer.after_request()  # the intermediate volumes are freed by now; keep RSS bounded
    timings = {"read_s": read_s, **seg.timings}
    timings["postprocess_s"] += time.perf_counter() - start
    return _Outcome(seg, encoded, slices, timings)


def _grid_check(settings: ApiSettings, model: ServedModel):
    """``check_grid(shape, affine)`` for ``open_upload``: the work budget on ``model``'s grid."""
    budget = WorkBudget(settings.max_voxels, settings.max_model_voxels, settings.max_window_voxels, settings.sw_overlap)
    return partial(budget.check, spacing=model.data_config.spacing, roi=model.data_config.roi_size)


async def _segment(request: Request, settings: ApiSettings, store: ModelStore, version: str | None, *, nifti: bool,
                   preview: bool) -> _Outcome:
    """Receive the upload into a private temporary folder, segment it, and always delete the folder.

    Admission first (503 with Retry-After beyond the in-flight limit), then the header and the
    work budget from the upload's first bytes (422 in milliseconds), then the inference queue.
    """
    started = time.perf_counter()
    gate = request.app.state.admission
    try:
        ticket = gate.admit()
    except QueueFullError as exc:
        log.info("refused a request: %d in flight", gate.in_flight)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc),
                            headers={"Retry-After": str(exc.retry_after_s)}) from None
    done = False
    work_dir = Path(tempfile.mkdtemp(prefix="fedmri-upload-", dir=settings.upload_dir))
    try:
        model = await run_in_threadpool(_resolve, store, version)
        # A .gz is inflated and its header checked while it arrives (server/api/upload.py).
        received = await receive_upload(request, work_dir / "upload", settings.max_upload_bytes,
                                        header_check(settings.max_voxels, _grid_check(settings, model)))
        upload_s = time.perf_counter() - started
        if received.inflated is None:
            await run_in_threadpool(inspect_upload, received.raw, settings.max_voxels, _grid_check(settings, model))
        outcome = await anyio.to_thread.run_sync(
            partial(_process, received, work_dir, model, settings, request.app.state.heap_trimmer, nifti, preview),
            limiter=request.app.state.inference_limiter,
        )
        done = True
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        gate.release(ticket, timed=done)
    outcome.timings = {"upload_s": upload_s, **outcome.timings, "total_s": time.perf_counter() - started}
    # Sizes, model and timings only: no file name or header text from the upload.
    log.info("segmented %d-byte upload (%d voxels) with model %s in %.2fs",
             received.size, outcome.seg.labels.size, model.version, outcome.timings["total_s"])
    return outcome


def _warnings_header(seg: Segmentation) -> dict[str, str]:
    """``X-Input-Warnings``: the header fields recovered from (field names and numbers only)."""
    warnings = seg.meta.get("warnings") or []
    return {"X-Input-Warnings": "; ".join(warnings)} if warnings else {}


def _server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{k.removesuffix('_s')};dur={v * 1000:.1f}" for k, v in timings.items())


@router.post(
    "",
    response_class=Response,
    openapi_extra=UPLOAD_BODY,
    responses={200: {"content": {"application/gzip": {}},
                     "description": "the label map (.nii.gz) on the input's grid"}},
)
async def segment(request: Request, settings: SettingsDep, store: ModelStoreDep, version: ModelVersion = None,
                  output: OutputFormat = "nifti") -> Response:
    """Segment an uploaded volume; returns the label map with the input's shape, affine and q/sform codes.

    Labels: 0 background, 1 grey matter, 2 white matter, 3 lesion. A zipped DICOM series is
    accepted too; ``?format=dicom-seg`` then returns a DICOM Segmentation of it.
    """
    outcome = await _segment(request, settings, store, version, nifti=output == "nifti", preview=False)
    ood = await run_in_threadpool(assess_upload, outcome.seg, settings)  # server/api/ood.py
    if output == "dicom-seg":  # server/api/dicom_upload.py
        timing = _server_timing(outcome.timings)
        return await run_in_threadpool(dicom_seg_response, outcome.seg, timing, ood_headers(ood))
    return Response(
        content=outcome.nifti,
        media_type="application/gzip",
        headers={
            "Content-Disposition": 'attachment; filename="segmentation.nii.gz"',
            "X-Model-Version": outcome.seg.model.version,
            "Server-Timing": _server_timing(outcome.timings),
            **_warnings_header(outcome.seg),
            **ood_headers(ood),
        },
    )


@router.post("/summary", response_model=SegmentSummary, openapi_extra=UPLOAD_BODY)
async def segment_summary(
    request: Request,
    response: Response,
    settings: SettingsDep,
    store: ModelStoreDep,
    version: ModelVersion = None,
    preview: Annotated[bool, Query(
        description="add three orthogonal slices and the label map (base64) for display")] = False,
) -> SegmentSummary:
    """Segment an uploaded volume; returns label volumes in mL, the input's geometry and timings."""
    outcome = await _segment(request, settings, store, version, nifti=preview, preview=preview)
    seg = outcome.seg
    volumes = label_volumes(seg.labels, seg.meta["affine"], seg.model.label_names)
    ood = await run_in_threadpool(assess_upload, seg, settings)  # server/api/ood.py
    response.headers.update({"X-Model-Version": seg.model.version, **_warnings_header(seg), **ood_headers(ood)})
    return SegmentSummary(
        model_version=seg.model.version,
        labels=volumes,
        volumes_ml={v["name"]: v["ml"] for v in volumes},
        input=input_summary(seg.meta),
        timings=outcome.timings,
        warnings=seg.meta.get("warnings", []),
        ood=ood,
        preview={"slices": outcome.preview, "segmentation_nii_gz": base64.b64encode(outcome.nifti).decode("ascii")}
        if preview else None,
    )
