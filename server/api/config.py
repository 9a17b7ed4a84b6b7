"""API settings, read from ``FEDMRI_*`` environment variables (pydantic settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ApiSettings"]


class ApiSettings(BaseSettings):
    """Settings of the inference service; every field can be set as ``FEDMRI_<NAME>``.

    Args:
        registry_dir: model registry written by ``fedmri train`` / ``fedmri federate``.
        data_dir: site data folders (used by the report route).
        reports_dir: where fairness reports are written (used by the report route).
        default_model: version served when a request names none (default: the registry's
            served version, else its newest).
        api_key: when set, every ``/v1`` route requires it in the ``X-API-Key`` header.
        admin_key: when set, ``POST /v1/admin/reload`` accepts it in ``X-Admin-Key`` (disabled otherwise).
        max_upload_bytes: largest accepted upload, enforced while it streams in (413 beyond).
        max_voxels: largest accepted volume, checked from the header before any voxel is read (422).
        max_model_voxels: largest volume after resampling to the model's spacing, computed from the
            header before any voxel is read (422).
        max_window_voxels: most voxels the sliding-window pass may run through the network (422).
        max_concurrent_inferences: volumes processed at once; further requests queue.
        max_queued_requests: segmentation requests admitted beyond those running (uploading or
            waiting); one more is answered 503 with ``Retry-After``.
        torch_threads: intra-op threads for torch (default: torch's own choice).
        upload_dir: folder for the per-request temporary files (default: the system's).
        model_cache_size: model versions kept in memory at once.
        sw_overlap: overlap of the sliding windows.
        sw_batch_size: windows per forward pass (default: as many as ``shared.inferer.WINDOW_PASS_VOXELS``
            allows for the backend, spread evenly; identical labels, measured fastest).
        inference_precision: ``fp32`` (MONAI's result), ``bf16`` (first conv float32) or ``auto``
            (bf16 where the processor has it natively); see ``shared.inferer``.
        heap_retain_mib: freed heap memory (MiB of RSS above the lowest level after a trim) kept for the next
            request; beyond it ``malloc_trim`` returns it to the OS. 0 trims after every request (its page
            faults then cost the next 1 mm request ~0.05 s); see ``server.api.memory``.
        device: where the network runs: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``.
    """

    model_config = SettingsConfigDict(env_prefix="FEDMRI_", env_file=".env", extra="ignore")

    registry_dir: Path = Path("runs/registry")
    data_dir: Path = Path("data")
    reports_dir: Path = Path("runs/reports")
    default_model: str | None = None
    api_key: str | None = None
    admin_key: str | None = None
    max_upload_bytes: int = Field(default=256 * 1024**2, gt=0)
    max_voxels: int = Field(default=512**3, gt=0)
    max_model_voxels: int = Field(default=256**3, gt=0)
    max_window_voxels: int = Field(default=4 * 256**3, gt=0)
    max_concurrent_inferences: int = Field(default=2, ge=1)
    max_queued_requests: int = Field(default=8, ge=0)
    torch_threads: int | None = Field(default=None, ge=1)
    upload_dir: Path | None = None
    model_cache_size: int = Field(default=4, ge=1)
    sw_overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    sw_batch_size: int | None = Field(default=None, ge=1)
    inference_precision: str = Field(default="fp32", pattern=r"^(fp32|bf16|auto)$")
    heap_retain_mib: int = Field(default=256, ge=0)
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")

    @field_validator("api_key", "admin_key", "default_model", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # FEDMRI_API_KEY= (empty) in a compose file means "no key", not "the empty key".
        return None if isinstance(value, str) and not value.strip() else value
