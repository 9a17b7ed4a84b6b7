"""Typed dependencies shared by the routes: settings, the model store and the API key check."""

from __future__ import annotations

import secrets
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader

from server.api.config import ApiSettings
from server.api.inference import ModelStore

__all__ = ["get_settings", "SettingsDep", "get_model_store", "ModelStoreDep", "require_api_key", "require_admin_key",
           "API_KEY_HEADER", "ADMIN_KEY_HEADER"]

API_KEY_HEADER = "X-API-Key"
ADMIN_KEY_HEADER = "X-Admin-Key"


@lru_cache
def get_settings() -> ApiSettings:
    """Settings from the environment, read on first use (never at import time)."""
    return ApiSettings()


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]


def get_model_store(request: Request) -> ModelStore:
    """The model store, following the registry: a newly served version is swapped in first (one ``stat``)."""
    store: ModelStore = request.app.state.models
    store.refresh()
    return store


ModelStoreDep = Annotated[ModelStore, Depends(get_model_store)]

_api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="required when FEDMRI_API_KEY is set")


def require_api_key(settings: SettingsDep, key: Annotated[str | None, Depends(_api_key_header)]) -> None:
    """401 unless no key is configured or the request carries it in ``X-API-Key``."""
    if settings.api_key is None:
        return
    if key is None or not secrets.compare_digest(key.encode(), settings.api_key.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            f"missing or wrong API key: send it in the {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": "APIKey"},
        )


_admin_key_header = APIKeyHeader(name=ADMIN_KEY_HEADER, auto_error=False, scheme_name="AdminKey",
                                 description="required by /v1/admin routes; set FEDMRI_ADMIN_KEY to enable them")


def require_admin_key(settings: SettingsDep, key: Annotated[str | None, Depends(_admin_key_header)]) -> None:
    """403 when no admin key is configured (admin routes are off), 401 unless ``X-Admin-Key`` carries it."""
    if settings.admin_key is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin routes are disabled: set FEDMRI_ADMIN_KEY to enable them")
    if key is None or not secrets.compare_digest(key.encode(), settings.admin_key.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            f"missing or wrong admin key: send it in the {ADMIN_KEY_HEADER} header",
            headers={"WWW-Authenticate": "AdminKey"},
        )
