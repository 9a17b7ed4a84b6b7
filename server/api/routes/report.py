"""The per-site fairness report of the served model, cached per model version."""

from __future__ import annotations

import threading
from collections import defaultdict
from enum import Enum

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import HTMLResponse, Response

from server.api.deps import ModelStoreDep, SettingsDep

router = APIRouter(prefix="/v1/report", tags=["report"])

# One report build per version at a time; a second request waits and then reads the cache.
_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
_locks_guard = threading.Lock()


class ReportFormat(str, Enum):
    html = "html"
    json = "json"


def _lock(version: str) -> threading.Lock:
    with _locks_guard:
        return _locks[version]


@router.get(
    "",
    response_class=HTMLResponse,
    responses={200: {"content": {"application/json": {}},
                     "description": "the report (HTML, or JSON with ?format=json)"},
               404: {"description": "no model registered, or no site data"}},
)
def get_report(
    settings: SettingsDep,
    store: ModelStoreDep,
    format: ReportFormat = Query(ReportFormat.html, description="html (self-contained page) or json (every number)"),
    refresh: bool = Query(False, description="rebuild even if a report of this model version is cached"),
) -> Response:
    """Evaluate the served model on every site's held-out cases (first call per version: slow) and return the report.

    Always the version the API serves now (``X-Model-Version``, ``X-Report-Version``): after the
    registry serves a new one, the report follows. Reports live in ``reports_dir/<version>/``
    (the same folder ``fedmri report`` writes), so a report made on the command line is served
    from the cache.
    """
    from server.report.build import generate_report

    if store.default is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"no model served yet, so no report: {store.error or 'no model registered'}")
    version = store.default.version
    folder = settings.reports_dir / version
    cached = True
    with _lock(version):
        if refresh or not (folder / "report.json").is_file() or not (folder / "report.html").is_file():
            cached = False
            try:
                generate_report(settings.registry_dir, settings.data_dir, folder, version=version)
            except (FileNotFoundError, ValueError) as exc:  # unknown/invalid version, no site folder under data_dir
                raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    headers = {"X-Report-Version": version, "X-Model-Version": version, "X-Report-Cached": str(cached).lower()}
    if format is ReportFormat.json:
        return Response((folder / "report.json").read_bytes(), media_type="application/json", headers=headers)
    return HTMLResponse((folder / "report.html").read_text(encoding="utf-8"), headers=headers)
