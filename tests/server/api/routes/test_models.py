"""GET /v1/models: the registry's versions with their federation metadata."""

from __future__ import annotations

import numpy as np


def test_lists_registered_versions(client):
    response = client.get("/v1/models")
    assert response.status_code == 200
    models = {m["version"]: m for m in response.json()["models"]}
    assert set(models) == {"tiny", "tiny-untrained"}
    tiny = models["tiny"]
    assert tiny["served"] and tiny["loaded"]
    assert (tiny["round"], tiny["strategy"], tiny["norm"], tiny["kind"]) == (3, "FedAvg", "instance", "federated")
    assert tiny["sites"] == ["site-a", "site-b", "site-c"]
    assert tiny["spacing_mm"] == [4.0, 4.0, 4.0] and tiny["roi_size"] == [32, 32, 32]
    assert (tiny["fedbn"], tiny["run_name"], tiny["missing_sites"]) == (False, "tiny", [])
    # Per-site metrics, flattened; the NaN in meta.json becomes null (JSON has no NaN).
    assert tiny["metrics"] == {"site-a": {"eval.dice_mean": 0.61, "eval.hd95_3": None, "train.train_loss": 0.4},
                               "site-b": {"eval.dice_mean": 0.6}}
    assert not models["tiny-untrained"]["served"] and not models["tiny-untrained"]["loaded"]


def test_a_requested_version_loads_on_demand(client, nifti_bytes, phantom):
    files = {"file": ("a.nii.gz", nifti_bytes(phantom(), np.eye(4)))}
    response = client.post("/v1/segment?model=tiny-untrained", files=files)
    assert response.status_code == 200 and response.headers["x-model-version"] == "tiny-untrained"
    models = {m["version"]: m for m in client.get("/v1/models").json()["models"]}
    assert models["tiny-untrained"]["loaded"] and models["tiny"]["served"]


def test_empty_registry_lists_nothing(make_client, tmp_path):
    assert make_client(registry_dir=tmp_path / "none").get("/v1/models").json() == {"models": []}
