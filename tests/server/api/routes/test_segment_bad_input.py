"""Every malformed upload is a 4xx JSON error that says what is wrong; the server keeps working."""

from __future__ import annotations

import gzip
import tracemalloc

import numpy as np
import pytest

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


SINGULAR = np.diag([2.0, 0.0, 2.0, 1.0])


def _bad_uploads(nifti_bytes, phantom) -> dict[str, tuple[bytes, int, str]]:
    """name -> (file bytes, expected status, expected text in ``detail``)."""
    vol = phantom((16, 16, 16))
    good_gz = nifti_bytes(vol, AFFINE)
    good_raw = nifti_bytes(vol, AFFINE, gz=False)
    wrong_magic = bytearray(good_raw)
    wrong_magic[344:348] = b"n+9\0"
    corrupt = bytearray(good_gz)
    for i in range(len(corrupt) // 2, len(corrupt) // 2 + 64):
        corrupt[i] ^= 0x5A
    pair = bytearray(good_raw)
    pair[344:348] = b"ni1\0"
    bad_dtype = bytearray(good_raw)
    bad_dtype[70:72] = (999).to_bytes(2, "little")  # datatype code no NIfTI version defines
    nan = vol.copy()
    nan[3, 4, 5] = np.nan
    inf = vol.copy()
    inf[0, 0, 0] = -np.inf
    return {
        "text file": (b"patient,age\nsomeone,42\n" * 40, 422, "not a NIfTI file"),
        "gzipped text": (gzip.compress(b"hello " * 200), 422, "not a NIfTI file"),
        "wrong magic": (bytes(wrong_magic), 422, "wrong NIfTI magic"),
        "two-file nifti": (bytes(pair), 422, "two-file NIfTI"),
        "truncated gzip": (good_gz[: len(good_gz) // 2], 422, "gzip stream ends early"),
        "corrupt gzip": (bytes(corrupt), 422, "corrupt gzip data"),
        "header only": (good_raw[:200], 422, "ends inside the NIfTI header"),
        "dims beyond data": (nifti_bytes(vol, AFFINE, gz=False, dims=(300, 300, 300)), 422, "but the file holds only"),
        "dims beyond data gz": (nifti_bytes(vol, AFFINE, dims=(300, 300, 300)), 422, "but the file holds only"),
        "dims beyond voxel limit": (nifti_bytes(vol, AFFINE, dims=(4000, 4000, 4000)), 422, "more than the limit of"),
        "negative dimension": (nifti_bytes(vol, AFFINE, dims=(16, -16, 16)), 422, "negative dimension"),
        "unknown data type": (bytes(bad_dtype), 422, "unknown data type"),
        "complex voxels": (nifti_bytes(vol.astype(np.complex64), AFFINE), 422, "unsupported voxel type"),
        "2-D image": (nifti_bytes(vol[:, :, 0], AFFINE), 422, "expected a 3-D volume"),
        "4-D, three volumes": (nifti_bytes(np.stack([vol] * 3, axis=-1), AFFINE), 422,
                               "expected a 3-D volume (or 4-D with one volume)"),
        "zero-length dimension": (nifti_bytes(np.zeros((16, 0, 16), np.float32), AFFINE), 422, "zero-length dimension"),
        "NaN voxel": (nifti_bytes(nan, AFFINE), 422, "NaN or Inf"),
        "Inf voxel": (nifti_bytes(inf, AFFINE), 422, "NaN or Inf"),
        "non-invertible affine": (nifti_bytes(vol, SINGULAR, qform_code=0), 422,
                                  "sform (srow_x/y/z) is not invertible"),
        "empty upload": (b"", 422, "empty file"),
    }


CASES = ["text file", "gzipped text", "wrong magic", "two-file nifti", "truncated gzip", "corrupt gzip", "header only",
         "dims beyond data", "dims beyond data gz", "dims beyond voxel limit", "negative dimension",
         "unknown data type",
         "complex voxels", "2-D image", "4-D, three volumes",
         "zero-length dimension", "NaN voxel", "Inf voxel", "non-invertible affine", "empty upload"]


@pytest.mark.parametrize("case", CASES)
def test_bad_upload_is_a_clear_4xx(client, nifti_bytes, phantom, upload_dir, case):
    content, code, message = _bad_uploads(nifti_bytes, phantom)[case]
    response = client.post("/v1/segment", files={"file": ("scan.nii.gz", content)})
    assert response.status_code == code, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["detail"]
    assert response.json()["detail"].startswith("upload:")  # names the upload, not the client's file name
    assert list(upload_dir.iterdir()) == []


def test_claimed_size_is_refused_before_allocating(client, nifti_bytes, phantom):
    """A header claiming 400**3 float32 voxels (256 MB) over 16 KB of data allocates nothing large."""
    content = nifti_bytes(phantom((16, 16, 16)), AFFINE, dims=(400, 400, 400))
    tracemalloc.start()
    try:
        response = client.post("/v1/segment", files={"file": ("scan.nii.gz", content)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.status_code == 422 and "but the file holds only" in response.json()["detail"]
    assert peak < 32 * 1024**2, f"peak Python allocation {peak / 1024**2:.0f} MiB"


def test_voxel_limit_is_configurable(make_client, nifti_bytes, phantom):
    client = make_client(max_voxels=10_000)
    response = client.post("/v1/segment", files={"file": ("scan.nii.gz", nifti_bytes(phantom((24, 24, 24)), AFFINE))})
    assert response.status_code == 422
    assert response.json()["detail"] == "upload: header claims 13824 voxels, more than the limit of 10000"


def test_wrong_form_field(client, nifti_bytes, phantom):
    response = client.post("/v1/segment", files={"image": ("scan.nii.gz", nifti_bytes(phantom(), AFFINE))})
    assert response.status_code == 422
    assert "no form field 'file'" in response.json()["detail"] and "'image'" in response.json()["detail"]


def test_file_field_twice(client, nifti_bytes, phantom):
    content = nifti_bytes(phantom(), AFFINE)
    response = client.post("/v1/segment", files=[("file", ("a.nii.gz", content)), ("file", ("b.nii.gz", content))])
    assert response.status_code == 422 and "more than once" in response.json()["detail"]


def test_not_multipart(client, nifti_bytes, phantom):
    response = client.post("/v1/segment", content=nifti_bytes(phantom(), AFFINE),
                           headers={"content-type": "application/gzip"})
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["detail"]


def test_malformed_multipart(client):
    body = b"--XYZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc\r\n--WRONG garbage"
    response = client.post("/v1/segment", content=body, headers={"content-type": "multipart/form-data; boundary=XYZ"})
    assert response.status_code in (400, 422)
    assert response.json()["detail"]


def test_server_keeps_working_after_bad_input(client, nifti_bytes, phantom, read_nifti):
    for content, _, _ in _bad_uploads(nifti_bytes, phantom).values():
        client.post("/v1/segment", files={"file": ("scan.nii.gz", content)})
    assert client.get("/healthz").status_code == 200
    vol = phantom((16, 16, 16))
    response = client.post("/v1/segment", files={"file": ("scan.nii.gz", nifti_bytes(vol, AFFINE))})
    assert response.status_code == 200
    assert read_nifti(response.content).shape == vol.shape
