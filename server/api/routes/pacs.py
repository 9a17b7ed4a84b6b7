"""PACS round trip: segment a series on the configured DICOMweb server and store the DICOM SEG back.

The PACS is the server's, not the caller's: its URL comes from ``FEDMRI_PACS_URL`` (and an
optional ``FEDMRI_PACS_AUTHORIZATION`` header value), so the API never fetches from an
address a request names. Without it the route answers 503.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.concurrency import run_in_threadpool

from server.api.deps import ModelStoreDep, SettingsDep, require_api_key
from server.api.inference import ModelLoadError, ModelNotFoundError
from server.api.schemas import ErrorResponse, LabelVolume

__all__ = ["router", "PacsSettings", "PacsRequest", "PacsResponse"]

log = logging.getLogger("fedmri.api")

_UID = r"^[0-9]+(\.[0-9]+)*$"


class PacsSettings(BaseSettings):
    """Where the API's PACS is (``FEDMRI_PACS_URL``, a DICOMweb root) and how to reach it."""

    model_config = SettingsConfigDict(env_prefix="FEDMRI_", env_file=".env", extra="ignore")

    pacs_url: str | None = None
    pacs_authorization: str | None = None
    pacs_timeout_s: float = Field(default=60.0, gt=0)


def get_pacs_settings() -> PacsSettings:
    return PacsSettings()


class PacsRequest(BaseModel):
    study: str = Field(max_length=64, pattern=_UID, description="StudyInstanceUID on the PACS")
    series: str | None = Field(
        default=None, max_length=64, pattern=_UID, description="SeriesInstanceUID (default: the study's only MR series)"
    )


class PacsResponse(BaseModel):
    model_version: str
    study: str
    series: str = Field(description="the series that was segmented")
    seg_series: str = Field(description="SeriesInstanceUID of the stored DICOM SEG")
    seg_instance: str = Field(description="SOPInstanceUID of the stored DICOM SEG")
    instances: int
    shape: list[int]
    labels: list[LabelVolume]
    timings: dict[str, float]


router = APIRouter(
    prefix="/v1/pacs",
    tags=["pacs"],
    dependencies=[Depends(require_api_key)],
    responses={
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse, "description": "unknown model, study or series"},
        422: {"model": ErrorResponse},
        502: {"model": ErrorResponse, "description": "the PACS refused a request or cannot be reached"},
        503: {"model": ErrorResponse, "description": "no PACS configured (FEDMRI_PACS_URL) or no model loaded"},
    },
)


@router.post("/segment", response_model=PacsResponse)
async def pacs_segment(
    body: PacsRequest,
    request: Request,
    settings: SettingsDep,
    store: ModelStoreDep,
    pacs: Annotated[PacsSettings, Depends(get_pacs_settings)],
    version: Annotated[
        str | None, Query(alias="model", max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    ] = None,
) -> PacsResponse:
    """Fetch one MR series of a study (WADO-RS), segment it and store the DICOM SEG in that study (STOW-RS)."""
    import anyio

    from server.pacs import PacsError, SeriesLookupError, dicomweb_client, round_trip

    if not pacs.pacs_url:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "no PACS configured: set FEDMRI_PACS_URL to its DICOMweb root"
        )
    try:
        model = await run_in_threadpool(store.get, version)
    except (ModelNotFoundError, ModelLoadError) as exc:
        code = status.HTTP_404_NOT_FOUND if version is not None and isinstance(exc, ModelNotFoundError) else 503
        raise HTTPException(code, str(exc)) from None
    client = dicomweb_client(
        pacs.pacs_url,
        pacs.pacs_timeout_s,
        {"Authorization": pacs.pacs_authorization} if pacs.pacs_authorization else None,
    )

    def work():
        return round_trip(
            client, body.study, model, body.series, settings.max_voxels, settings.sw_overlap, settings.sw_batch_size
        )

    try:
        result = await anyio.to_thread.run_sync(work, limiter=request.app.state.inference_limiter)
    except SeriesLookupError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except PacsError as exc:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, str(exc)) from None
    return PacsResponse(
        model_version=result.model_version,
        study=result.study_uid,
        series=result.series_uid,
        seg_series=result.seg_series_uid,
        seg_instance=result.seg_sop_instance_uid,
        instances=result.instances,
        shape=list(result.shape),
        labels=result.labels,
        timings=result.timings,
    )
