"""The served model follows the registry: swapped atomically, named on every response, reported on."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from shared.registry import mark_served

ADMIN_KEY = "let me in, operator"


@pytest.fixture
def registry(api_registry, tmp_path):
    """A private copy of the test registry (serving ``tiny``), free to change."""
    path = tmp_path / "registry"
    shutil.copytree(api_registry, path)
    return path


def _cached_reports(folder, versions) -> None:
    """A cached report per version, as ``fedmri report`` leaves them."""
    for version in versions:
        (folder / version).mkdir(parents=True)
        (folder / version / "report.json").write_text(json.dumps({"version": version}))
        (folder / version / "report.html").write_text(f"<html>{version}</html>")


def test_newly_served_model_is_swapped_in_and_reported(make_client, registry, tmp_path, nifti_bytes, phantom):
    _cached_reports(tmp_path / "reports", ["tiny", "tiny-untrained"])
    client = make_client(registry_dir=registry, reports_dir=tmp_path / "reports")
    content = nifti_bytes(phantom(), np.eye(4))
    assert client.get("/readyz").json()["model_version"] == "tiny"
    report = client.get("/v1/report", params={"format": "json"})
    assert report.json() == {"version": "tiny"} and report.headers["x-model-version"] == "tiny"

    mark_served(registry, "tiny-untrained")  # what `fedmri federate` does after its last round
    response = client.post("/v1/segment", files={"file": ("a.nii.gz", content)})
    assert response.status_code == 200 and response.headers["x-model-version"] == "tiny-untrained"
    summary = client.post("/v1/segment/summary", files={"file": ("a.nii.gz", content)})
    assert summary.json()["model_version"] == "tiny-untrained"
    assert client.get("/readyz").json()["model_version"] == "tiny-untrained"
    report = client.get("/v1/report", params={"format": "json"})
    assert report.json() == {"version": "tiny-untrained"}
    assert report.headers["x-model-version"] == report.headers["x-report-version"] == "tiny-untrained"
    served = {m["version"]: m["served"] for m in client.get("/v1/models").json()["models"]}
    assert served == {"tiny": False, "tiny-untrained": True}
    # An explicitly requested version is still named as such.
    response = client.post("/v1/segment?model=tiny", files={"file": ("a.nii.gz", content)})
    assert response.headers["x-model-version"] == "tiny"


def test_swaps_do_not_fail_requests_in_flight(make_client, registry, nifti_bytes, phantom):
    client = make_client(registry_dir=registry, max_concurrent_inferences=2, max_queued_requests=8)
    content = nifti_bytes(phantom((30, 26, 20)), np.eye(4) * [3, 3, 3, 1])
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def post_until_stopped():
        while not stop.is_set():
            r = client.post("/v1/segment", files={"file": ("a.nii.gz", content)})
            results.append((r.status_code, r.headers.get("x-model-version")))

    threads = [threading.Thread(target=post_until_stopped) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for version in ("tiny-untrained", "tiny", "tiny-untrained", "tiny"):
            n = len(results)
            mark_served(registry, version)
            while len(results) < n + 3:  # a few requests on each version
                threading.Event().wait(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert results and all(code == 200 for code, _ in results), results
    assert {v for _, v in results} == {"tiny", "tiny-untrained"}


def test_a_broken_newly_served_version_keeps_the_old_one(make_client, registry, nifti_bytes, phantom):
    client = make_client(registry_dir=registry)
    (registry / "tiny-untrained" / "model.pt").write_bytes(b"truncated")
    mark_served(registry, "tiny-untrained")
    response = client.post("/v1/segment", files={"file": ("a.nii.gz", nifti_bytes(phantom(), np.eye(4)))})
    assert response.status_code == 200 and response.headers["x-model-version"] == "tiny"
    assert client.get("/readyz").json()["model_version"] == "tiny"


def test_admin_reload_needs_its_own_key(make_client, registry):
    assert make_client(registry_dir=registry).post("/v1/admin/reload").status_code == 403
    client = make_client(registry_dir=registry, admin_key=ADMIN_KEY, api_key="api")
    for headers in ({}, {"X-Admin-Key": "wrong"}, {"X-API-Key": "api"}):
        response = client.post("/v1/admin/reload", headers=headers)
        assert response.status_code == 401 and "X-Admin-Key" in response.json()["detail"]
    response = client.post("/v1/admin/reload", headers={"X-Admin-Key": ADMIN_KEY})
    assert response.status_code == 200
    assert response.json() == {"model_version": "tiny", "previous": "tiny", "changed": False}
    (registry / "served.json").write_text(json.dumps({"version": "tiny-untrained"}))
    response = client.post("/v1/admin/reload", headers={"X-Admin-Key": ADMIN_KEY})
    assert response.json() == {"model_version": "tiny-untrained", "previous": "tiny", "changed": True}
    assert response.headers["x-model-version"] == "tiny-untrained"
