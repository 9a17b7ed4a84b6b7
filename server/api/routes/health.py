"""Liveness and readiness probes (no API key: orchestrators call them)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from server.api.deps import ModelStoreDep
from server.api.schemas import ErrorResponse, Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up and answering."""
    return Health()


@router.get("/readyz", response_model=Ready, responses={503: {"model": ErrorResponse}})
def readyz(store: ModelStoreDep) -> Ready:
    """Ready only once the default model is loaded."""
    if store.default is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"no model loaded: {store.error or 'still starting'}")
    return Ready(model_version=store.default.version)
