"""The FastAPI application: routers, the model loaded in ``lifespan``, one domain-error handler.

Run it with ``fedmri serve`` (uvicorn on 127.0.0.1:8080 by default).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import torch
from fastapi import Depends, FastAPI, Request, status
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.budget import AdmissionGate, LimitExceededError
from server.api.config import ApiSettings
from server.api.deps import get_settings, require_api_key
from server.api.inference import ModelLoadError, ModelNotFoundError, ModelStore
from server.api.memory import HeapTrimmer
from server.api.routes import admin, health, models, pacs, report, segment, ui
from server.api.routes.ui import STATIC_DIR, SWAGGER_DIR
from shared.errors import InvalidVolumeError

__all__ = ["create_app"]

log = logging.getLogger("fedmri.api")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the served model once per process, before the first request."""
    settings: ApiSettings = app.state.settings
    if settings.upload_dir is not None:
        settings.upload_dir.mkdir(parents=True, exist_ok=True)
    store = ModelStore(settings.registry_dir, settings.default_model, settings.model_cache_size)
    try:
        model = await run_in_threadpool(store.load_default)
        log.info("serving model %s from %s (torch threads per inference: %d)", model.version, settings.registry_dir,
                 settings.torch_threads or torch.get_num_threads())
    except (ModelNotFoundError, ModelLoadError) as exc:  # stay up, not ready: /readyz says why
        store.error = str(exc)
        log.warning("no model loaded, /readyz answers 503: %s", exc)
    app.state.models = store
    app.state.inference_limiter = anyio.CapacityLimiter(settings.max_concurrent_inferences)
    app.state.admission = AdmissionGate(settings.max_concurrent_inferences, settings.max_queued_requests)
    app.state.heap_trimmer = HeapTrimmer(settings.heap_retain_mib * 1024**2)
    yield


class ModelVersionHeader:
    """ASGI middleware: every HTTP response names the served model in ``X-Model-Version`` (``none`` before one).

    Routes that answer with another version (``?model=``) set the header themselves and keep it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "x-model-version" not in headers:
                    store = getattr(scope["app"].state, "models", None)
                    headers["X-Model-Version"] = store.default.version if store and store.default else "none"
            await send(message)

        await self.app(scope, receive, send_with_version)


async def invalid_volume_handler(request: Request, exc: InvalidVolumeError) -> JSONResponse:
    """A volume that cannot be used is the client's problem: 422 with the reason (and the limit, if one)."""
    log.info("rejected upload: %s", exc)  # messages name "upload", never the client's file
    content: dict = {"detail": str(exc)}
    if isinstance(exc, LimitExceededError):
        content.update(limit=exc.limit, value=exc.value, maximum=exc.maximum)
    return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content=content)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    """Build the app; ``settings`` default to ``FEDMRI_*`` environment variables."""
    settings = settings or get_settings()
    app = FastAPI(
        title="fedmri inference",
        summary="Brain MRI segmentation (grey matter, white matter, lesion) by a federated instance-norm UNet.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by routes/ui.py from local files instead of a CDN
    )
    app.state.settings = settings
    app.dependency_overrides[get_settings] = lambda: settings  # routes see these settings, not the environment's
    app.add_exception_handler(InvalidVolumeError, invalid_volume_handler)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(segment.router)
    app.include_router(pacs.router)
    app.include_router(report.router, dependencies=[Depends(require_api_key)])
    app.include_router(admin.router)
    app.include_router(ui.router)
    app.mount("/static/swagger", StaticFiles(directory=SWAGGER_DIR), name="swagger")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(ModelVersionHeader)
    return app
