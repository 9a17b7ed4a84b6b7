"""The OOD warning on segmentation responses (``shared.ood``): JSON ``ood`` and ``X-OOD-*`` headers.

The served model's ``ood.json`` (written with it into the registry) holds every training
site's aggregate intensity summary and the threshold; the fairness report of the same model
(``<reports_dir>/<version>/report.json``, if it has been built) gives the expected tissue Dice.
A model without ``ood.json`` answers ``ood: null`` and no headers.
"""

from __future__ import annotations

import json
import logging
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from shared.ood import assess, read_ood

__all__ = ["OodAssessor", "ood_headers", "assess_upload"]

log = logging.getLogger("fedmri.api")


class OodAssessor:
    """Reads a model's OOD record and report once per file version (thread-safe), then scores volumes."""

    def __init__(self, registry_dir: Path, reports_dir: Path) -> None:
        self.registry_dir, self.reports_dir = Path(registry_dir), Path(reports_dir)
        self._cache: dict[str, tuple[tuple, dict | None, dict | None]] = {}
        self._lock = threading.Lock()

    def _stamp(self, version: str) -> tuple:
        stamps = []
        for path in (self.registry_dir / version / "ood.json", self.reports_dir / version / "report.json"):
            try:
                stat = path.stat()
                stamps.append((stat.st_mtime_ns, stat.st_size))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _load(self, version: str) -> tuple[dict | None, dict | None]:
        stamp = self._stamp(version)
        with self._lock:
            cached = self._cache.get(version)
            if cached is not None and cached[0] == stamp:
                return cached[1], cached[2]
        record = read_ood(self.registry_dir, version)
        report = None
        path = self.reports_dir / version / "report.json"
        if record is not None and path.is_file():
            try:
                report = json.loads(path.read_text())
            except (OSError, ValueError):
                report = None
        with self._lock:
            self._cache[version] = (stamp, record, report)
        return record, report

    def __call__(self, image: np.ndarray, version: str) -> dict | None:
        """The ``ood`` object for ``image`` segmented by ``version``; None when the model has no OOD record."""
        record, report = self._load(version)
        if record is None:
            return None
        try:
            return assess(image, record, report)
        except (ValueError, KeyError, TypeError) as exc:  # a constant volume, or a record of another format
            log.warning("no OOD score for this upload (%s)", type(exc).__name__)
            return None


def ood_headers(ood: dict | None) -> dict[str, str]:
    """Response headers ``X-OOD-Score``, ``-Threshold``, ``-Warning``, ``-Nearest-Site``, ``-Expected-Tissue-Dice``."""
    if ood is None:
        return {}
    headers = {
        "X-OOD-Score": f"{ood['score']:.4f}",
        "X-OOD-Threshold": f"{ood['threshold']:.4f}",
        "X-OOD-Warning": "true" if ood["warning"] else "false",
        "X-OOD-Nearest-Site": str(ood["nearest_site"]).encode("ascii", "replace").decode("ascii")[:64],
    }
    if ood.get("expected_tissue_dice") is not None:
        headers["X-OOD-Expected-Tissue-Dice"] = f"{ood['expected_tissue_dice']:.4f}"
    return headers


@lru_cache(maxsize=8)
def _assessor(registry_dir: Path, reports_dir: Path) -> OodAssessor:
    return OodAssessor(registry_dir, reports_dir)


def assess_upload(seg, settings) -> dict | None:
    """The ``ood`` object of a finished ``Segmentation`` under the API's settings (blocking: a worker thread)."""
    return _assessor(Path(settings.registry_dir), Path(settings.reports_dir))(seg.image, seg.model.version)
