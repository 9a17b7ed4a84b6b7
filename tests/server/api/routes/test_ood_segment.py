"""The OOD warning on /v1/segment responses: JSON ``ood`` in the summary, ``X-OOD-*`` headers on NIfTI and SEG."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from shared.dicom import make_mr_series, series_to_zip
from shared.ood import _in_signal_range, build_record, site_reference_from_dir, write_ood
from shared.scanner import ScannerProfile


@pytest.fixture(scope="module")
def ood_registry(api_registry, tiny_data_dir, tmp_path_factory):
    """A copy of the API registry; its served model has an ood.json from the tiny sites and a report with stops."""
    root = tmp_path_factory.mktemp("ood")
    registry = root / "registry"
    shutil.copytree(api_registry, registry)
    sites = {p.name: site_reference_from_dir(p) for p in sorted(tiny_data_dir.iterdir()) if p.is_dir()}
    record = build_record(sites)
    write_ood(registry, "tiny", record)
    reports = root / "reports"
    (reports / "tiny").mkdir(parents=True)
    agreement = {
        ("gamma", 0.85): 0.99,
        ("gamma", 0.7): 0.97,
        ("gamma", 0.5): 0.9,
        ("gamma", 0.35): 0.75,
        ("bias", 0.1): 0.99,
        ("bias", 0.2): 0.98,
        ("bias", 0.35): 0.93,
        ("bias", 0.5): 0.85,
    }
    report = {
        "sites": [{"site": name, "dice": {"tissue": {"mean": 0.8}}} for name in sites],
        "invariance": {"stops": [{"kind": k, "level": lv, "dice_mean": d} for (k, lv), d in agreement.items()]},
    }
    (reports / "tiny" / "report.json").write_text(json.dumps(report))
    return {"registry": registry, "reports": reports, "record": record}


@pytest.fixture
def ood_client(make_client, ood_registry):
    return make_client(registry_dir=ood_registry["registry"], reports_dir=ood_registry["reports"])


@pytest.fixture(scope="module")
def scan(site_case):
    img = nib.load(site_case[0])
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


@pytest.mark.parametrize("s, b", [(1.0, 0.0), (0.3, 700.0), (6.0, -2500.0)])
def test_affine_shifted_scan_gets_no_warning(ood_client, scan, nifti_bytes, s, b):
    volume, affine = scan
    response = ood_client.post("/v1/segment/summary", files={"file": ("v.nii.gz", nifti_bytes(s * volume + b, affine))})
    assert response.status_code == 200, response.text
    ood = response.json()["ood"]
    assert ood["warning"] is False and ood["score"] < ood["threshold"] == 2.0
    assert ood["nearest_site"] in {"site-a", "site-b", "site-c"}
    assert 0.7 < ood["expected_tissue_dice"] <= 0.8
    assert response.headers["x-ood-warning"] == "false"


@pytest.mark.parametrize(
    "profile", [ScannerProfile(gamma=0.3), ScannerProfile(bias_strength=0.9)], ids=["gamma", "bias"]
)
def test_strong_gamma_or_bias_field_gets_a_warning_in_json_and_headers(
    ood_client, scan, nifti_bytes, read_nifti, profile
):
    volume, affine = scan
    distorted = (4.0 * _in_signal_range(volume, profile, np.random.default_rng(0)) - 300.0).astype(np.float32)
    content = nifti_bytes(distorted, affine)
    summary = ood_client.post("/v1/segment/summary", files={"file": ("v.nii.gz", content)})
    assert summary.status_code == 200, summary.text
    ood = summary.json()["ood"]
    assert ood["warning"] is True and ood["score"] > 2.0
    assert ood["expected_tissue_dice"] < 0.8  # lower than at the nearest site itself
    response = ood_client.post("/v1/segment", files={"file": ("v.nii.gz", content)})
    assert response.status_code == 200
    assert response.headers["x-ood-warning"] == "true"
    assert float(response.headers["x-ood-score"]) == pytest.approx(ood["score"], abs=1e-4)
    assert response.headers["x-ood-nearest-site"] == ood["nearest_site"]
    read_nifti(response.content)  # the segmentation itself still comes back


def test_dicom_seg_response_carries_the_ood_headers(ood_client, scan):
    volume, affine = scan
    distorted = _in_signal_range(volume, ScannerProfile(gamma=0.3), None)
    content = series_to_zip(make_mr_series(distorted, affine))
    response = ood_client.post("/v1/segment", params={"format": "dicom-seg"}, files={"file": ("s.zip", content)})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    assert response.headers["x-ood-warning"] == "true"


def test_model_without_ood_record_answers_null(client, scan, nifti_bytes):
    volume, affine = scan
    response = client.post("/v1/segment/summary", files={"file": ("v.nii.gz", nifti_bytes(volume, affine))})
    assert response.status_code == 200
    assert response.json()["ood"] is None and "x-ood-score" not in response.headers
