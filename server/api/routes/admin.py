"""Operator routes, behind their own key (``FEDMRI_ADMIN_KEY``, sent as ``X-Admin-Key``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from server.api.deps import require_admin_key
from server.api.inference import ModelStore
from server.api.schemas import ErrorResponse

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin_key)],
    responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
)


class Reloaded(BaseModel):
    model_version: str = Field(description="the version now answering requests that name no model")
    previous: str | None = Field(description="the version served before the reload")
    changed: bool


@router.post("/reload", response_model=Reloaded, responses={503: {"model": ErrorResponse}})
async def reload_served_model(request: Request) -> Reloaded:
    """Re-read the registry's ``served.json`` now and swap in its version (requests in flight finish on the old one)."""
    store: ModelStore = request.app.state.models
    previous = store.default.version if store.default else None
    model = await run_in_threadpool(store.refresh, True)
    if model is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"no model loaded: {store.error or 'nothing served'}")
    if store.error and model.version == previous:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"{store.error}; still serving {previous}")
    return Reloaded(model_version=model.version, previous=previous, changed=model.version != previous)
