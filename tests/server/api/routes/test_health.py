"""GET /healthz and /readyz."""

from __future__ import annotations


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_ready_once_the_served_model_is_loaded(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "model_version": "tiny"}


def test_default_model_setting_picks_the_version(make_client):
    assert make_client(default_model="tiny-untrained").get("/readyz").json()["model_version"] == "tiny-untrained"


def test_not_ready_without_a_model(make_client, tmp_path, nifti_bytes, phantom):
    import numpy as np

    client = make_client(registry_dir=tmp_path / "empty-registry")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["detail"].startswith("no model loaded: no model registered in")
    assert client.get("/healthz").status_code == 200  # alive, just not ready
    response = client.post("/v1/segment", files={"file": ("a.nii.gz", nifti_bytes(phantom(), np.eye(4)))})
    assert response.status_code == 503 and "no model loaded" in response.json()["detail"]
