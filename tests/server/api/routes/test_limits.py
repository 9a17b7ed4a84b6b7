"""Work budget, in-flight bound and header recovery, through the real app."""

from __future__ import annotations

import gzip
import time

import nibabel as nib
import numpy as np
import pytest

LPS = np.array([[-1.2, 0, 0, 30], [0, 0, 3.0, -40], [0, -2.0, 0, 25], [0, 0, 0, 1]])


def _post(client, content: bytes, path: str = "/v1/segment"):
    return client.post(path, files={"file": ("scan.nii.gz", content)})


def test_coarse_voxels_are_refused_fast_before_resampling(make_client, nifti_bytes, upload_dir):
    """48^3 voxels (a ~100 kB .nii.gz) declaring 24 mm would be 565^3 on a 2 mm model grid: 422 at once."""
    client = make_client(max_model_voxels=256**3)
    content = nifti_bytes(np.random.default_rng(0).normal(100, 5, (48, 48, 48)).astype(np.float32),
                          np.diag([24.0, 24.0, 24.0, 1.0]))
    started = time.perf_counter()
    response = _post(client, content)
    elapsed = time.perf_counter() - started
    assert response.status_code == 422, response.text
    body = response.json()
    # The tiny model works at 4 mm: (48 - 1) * 6 + 1 = 283 voxels per axis.
    assert body["limit"] == "FEDMRI_MAX_MODEL_VOXELS" and body["value"] == 283**3 and body["maximum"] == 256**3
    assert "283x283x283" in body["detail"] and body["detail"].startswith("upload:")
    assert elapsed < 1.0, f"refusal took {elapsed:.2f} s"
    assert response.headers["x-model-version"] == "tiny"
    assert list(upload_dir.iterdir()) == []


def test_sliding_window_work_limit(make_client, nifti_bytes, phantom):
    client = make_client(max_window_voxels=32**3)  # one 32^3 window
    response = _post(client, nifti_bytes(phantom((40, 20, 16)), np.diag([4.0, 4.0, 4.0, 1.0])))
    assert response.status_code == 422
    assert response.json()["limit"] == "FEDMRI_MAX_WINDOW_VOXELS" and response.json()["value"] == 2 * 32**3
    assert _post(client, nifti_bytes(phantom((20, 20, 16)), np.diag([4.0, 4.0, 4.0, 1.0]))).status_code == 200


def test_input_voxel_limit_names_the_setting(make_client, nifti_bytes, phantom):
    client = make_client(max_voxels=1000)
    body = _post(client, nifti_bytes(phantom(), np.eye(4))).json()
    assert "more than the limit of 1000" in body["detail"]


def test_full_queue_answers_503_with_retry_after(make_client, nifti_bytes, phantom, upload_dir):
    """With every admission ticket taken, a request is refused at once; released, it is served."""
    client = make_client(max_concurrent_inferences=1, max_queued_requests=1)
    gate = client.app.state.admission
    tickets = [gate.admit(), gate.admit()]  # what two requests in flight hold
    content = nifti_bytes(phantom(), np.eye(4))
    response = _post(client, content)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert "server busy: 2 segmentation requests in flight, the limit is 2" in response.json()["detail"]
    assert list(upload_dir.iterdir()) == []
    for ticket in tickets:
        gate.release(ticket, timed=False)
    assert _post(client, content).status_code == 200
    assert gate.in_flight == 0


def test_gate_is_released_after_errors(make_client, nifti_bytes, phantom):
    client = make_client(max_concurrent_inferences=1, max_queued_requests=0)
    for _ in range(3):
        assert _post(client, b"not a volume").status_code == 422
    assert _post(client, nifti_bytes(phantom(), np.eye(4))).status_code == 200
    assert client.app.state.admission.in_flight == 0


def _broken_qform(nifti_bytes, phantom, version: int) -> bytes:
    raw = bytearray(nifti_bytes(phantom((26, 18, 12)), LPS, version=version, gz=False))
    klass = nib.Nifti2Header if version == 2 else nib.Nifti1Header
    hdr = klass.from_fileobj(__import__("io").BytesIO(bytes(raw[: klass.sizeof_hdr])))
    hdr["quatern_b"], hdr["quatern_c"] = 0.9, 0.9  # b^2 + c^2 + d^2 > 1: nibabel cannot build the qform
    raw[: klass.sizeof_hdr] = hdr.binaryblock
    return gzip.compress(bytes(raw))


@pytest.mark.parametrize("version", [1, 2])
def test_broken_qform_is_recovered_from_the_sform_and_said_so(client, nifti_bytes, read_nifti, phantom, version):
    content = _broken_qform(nifti_bytes, phantom, version)
    response = _post(client, content)
    assert response.status_code == 200, response.text
    assert "qform ignored: quaternion norm" in response.headers["x-input-warnings"]
    out = read_nifti(response.content)
    assert out.shape == (26, 18, 12) and type(out.header) is (nib.Nifti2Header if version == 2 else nib.Nifti1Header)
    np.testing.assert_allclose(out.affine, LPS, atol=1e-5)  # the valid sform
    for getter in ("get_qform", "get_sform"):
        matrix, code = getattr(out.header, getter)(coded=True)
        assert code == 1
        np.testing.assert_allclose(matrix, LPS, atol=1e-4)

    summary = _post(client, content, "/v1/segment/summary")
    assert summary.status_code == 200
    body = summary.json()
    assert any(w.startswith("qform ignored") for w in body["warnings"])
    assert body["input"]["qform_code"] == 1 and body["input"]["spacing_mm"] == [1.2, 2.0, 3.0]
    assert "qform ignored" in summary.headers["x-input-warnings"]


def test_broken_sform_falls_back_to_the_qform(client, nifti_bytes, read_nifti, phantom):
    raw = bytearray(nifti_bytes(phantom((26, 18, 12)), LPS, gz=False))
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])))
    hdr["srow_y"] = [np.nan, 0, 0, 0]
    raw[:348] = hdr.binaryblock
    response = _post(client, bytes(raw))
    assert response.status_code == 200, response.text
    assert "sform ignored" in response.headers["x-input-warnings"]
    out = read_nifti(response.content)
    np.testing.assert_allclose(out.affine, LPS, atol=1e-4)
    assert out.header.get_sform(coded=True)[1] == 1


def test_clean_upload_has_no_warnings(client, nifti_bytes, phantom):
    content = nifti_bytes(phantom(), LPS)
    assert "x-input-warnings" not in _post(client, content).headers
    assert _post(client, content, "/v1/segment/summary").json()["warnings"] == []


def test_every_response_names_the_model_version(client):
    for path in ("/healthz", "/readyz", "/v1/models", "/no-such-page"):
        assert client.get(path).headers["x-model-version"] == "tiny", path
