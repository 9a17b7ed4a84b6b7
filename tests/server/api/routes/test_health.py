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


def test_corrupt_served_model_keeps_the_server_up_but_not_ready(make_client, api_registry, tmp_path, nifti_bytes,
                                                                 phantom):
    import shutil

    import numpy as np

    registry = tmp_path / "registry"
    shutil.copytree(api_registry, registry)
    weights = registry / "tiny" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated by a full disk, say
    client = make_client(registry_dir=registry, upload_dir=tmp_path / "new" / "uploads")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["detail"].startswith("no model loaded: model version 'tiny' could not be loaded (")
    upload = {"file": ("a.nii.gz", nifti_bytes(phantom(), np.eye(4)))}
    response = client.post("/v1/segment?model=tiny", files=upload)
    assert response.status_code == 503 and "could not be loaded" in response.json()["detail"]
    # Other versions still work; the upload folder was created on startup.
    assert client.post("/v1/segment?model=tiny-untrained", files=upload).status_code == 200
    assert (tmp_path / "new" / "uploads").is_dir()
