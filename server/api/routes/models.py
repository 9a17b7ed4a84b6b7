"""Registered model versions, read live from the registry's ``meta.json`` files."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.api.deps import ModelStoreDep, require_api_key
from server.api.schemas import ErrorResponse, ModelInfo, ModelList, finite_metrics
from shared.registry import list_models

router = APIRouter(
    prefix="/v1/models",
    tags=["models"],
    dependencies=[Depends(require_api_key)],
    responses={401: {"model": ErrorResponse}},
)


def _model_info(meta: dict, served: str | None, loaded: set[str]) -> ModelInfo:
    data_config = meta.get("data_config", {})
    round_ = meta.get("round", meta.get("server_round"))
    return ModelInfo(
        version=meta["version"],
        created=meta.get("created"),
        served=meta["version"] == served,
        loaded=meta["version"] in loaded,
        kind=meta.get("kind"),
        strategy=meta.get("strategy"),
        norm=meta.get("norm", meta.get("model_config", {}).get("norm")),
        round=round_ if isinstance(round_, int) else None,
        fedbn=meta.get("fedbn") if isinstance(meta.get("fedbn"), bool) else None,
        run_name=meta.get("run_name"),
        sites=[str(s) for s in meta.get("sites", [])],
        missing_sites=[str(s) for s in meta.get("missing_sites", [])],
        spacing_mm=list(data_config.get("spacing", [])),
        roi_size=list(data_config.get("roi_size", [])),
        metrics=finite_metrics(meta.get("metrics")),
    )


@router.get("", response_model=ModelList)
def list_registered_models(store: ModelStoreDep) -> ModelList:
    """Every complete version in the registry, oldest first, with its per-site metrics."""
    served = store.default.version if store.default else None
    loaded = set(store.loaded_versions())
    return ModelList(models=[_model_info(meta, served, loaded) for meta in list_models(store.registry_dir)])
