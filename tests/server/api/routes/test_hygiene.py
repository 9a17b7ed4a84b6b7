"""Security and hygiene: API key, upload size limit, temporary files, and what the logs may say."""

from __future__ import annotations

import gzip
import logging

import numpy as np
import pytest

from server.api.upload import MULTIPART_OVERHEAD

KEY = "correct horse battery staple"


@pytest.fixture
def keyed(make_client):
    return make_client(api_key=KEY)


@pytest.mark.parametrize("method, path",
                         [("get", "/v1/models"), ("post", "/v1/segment"), ("post", "/v1/segment/summary")])
def test_api_key_required_when_configured(keyed, method, path, nifti_bytes, phantom):
    kwargs = {"files": {"file": ("a.nii.gz", nifti_bytes(phantom(), np.eye(4)))}} if method == "post" else {}
    for headers in ({}, {"X-API-Key": "wrong"}):
        response = getattr(keyed, method)(path, headers=headers, **kwargs)
        assert response.status_code == 401
        assert response.json()["detail"] == "missing or wrong API key: send it in the X-API-Key header"
    response = getattr(keyed, method)(path, headers={"X-API-Key": KEY}, **kwargs)
    assert response.status_code == 200, response.text


def test_report_route_is_mounted_behind_the_key(keyed):
    response = keyed.get("/v1/report")
    assert response.status_code == 401 and "X-API-Key" in response.json()["detail"]


def test_probes_and_page_need_no_key(keyed):
    for path in ("/healthz", "/readyz", "/", "/docs", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path


def test_blank_key_setting_means_no_key(make_client):
    assert make_client(api_key="  ").get("/v1/models").status_code == 200


def _multipart(content: bytes, boundary: str = "fedmriboundary") -> tuple[bytes, dict]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.nii.gz\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_upload_over_the_limit_is_413(make_client, upload_dir):
    client = make_client(max_upload_bytes=50_000)
    # Declared too large: refused from Content-Length, before reading the body.
    response = client.post("/v1/segment", files={"file": ("a.nii.gz", b"\0" * (50_000 + MULTIPART_OVERHEAD + 1))})
    assert response.status_code == 413
    assert response.json()["detail"] == "upload exceeds the limit of 50000 bytes"
    # No Content-Length (chunked): counted while streaming; the file part alone is over the limit.
    body, headers = _multipart(b"\1" * 60_000)
    chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
    response = client.post("/v1/segment", content=chunks, headers=headers)
    assert response.status_code == 413
    assert response.json()["detail"] == "upload exceeds the limit of 50000 bytes"
    assert list(upload_dir.iterdir()) == []
    # Just under the limit is accepted (and fails later, on content).
    body, headers = _multipart(b"\1" * 49_000)
    assert client.post("/v1/segment", content=body, headers=headers).status_code == 422


def test_temporary_files_are_deleted(client, upload_dir, nifti_bytes, phantom, monkeypatch):
    """Success, bad input and a crash inside the pipeline all leave the upload folder empty."""
    import server.api.routes.segment as segment_route

    seen = []
    real_open_upload = segment_route.open_upload

    def spy(raw, work_dir, *args, **kwargs):
        seen.append(sorted(p.name for p in work_dir.iterdir()))  # the upload is on disk while it is read
        return real_open_upload(raw, work_dir, *args, **kwargs)

    monkeypatch.setattr(segment_route, "open_upload", spy)
    good = nifti_bytes(phantom(), np.eye(4))
    assert client.post("/v1/segment", files={"file": ("a.nii.gz", good)}).status_code == 200
    assert client.post("/v1/segment/summary?preview=true", files={"file": ("a.nii.gz", good)}).status_code == 200
    assert client.post("/v1/segment", files={"file": ("a.nii.gz", good[:300])}).status_code == 422
    assert client.post("/v1/segment", files={"file": ("a.nii", gzip.decompress(good))}).status_code == 200
    # A .gz is inflated while it arrives (the compressed copy is gone once it is); the truncated one is
    # refused before the pipeline; a plain .nii is read as sent.
    assert seen == [["volume.nii"], ["volume.nii"], ["upload"]]
    assert list(upload_dir.iterdir()) == []


def test_logs_carry_no_file_names_or_header_text(client, nifti_bytes, phantom, caplog):
    secret_name, secret_text = "DOE_JANE_19700101.nii.gz", "DOE^JANE MRN 123456"

    def described(**kw):
        import gzip

        import nibabel as nib

        img = nib.Nifti1Image(phantom(), np.eye(4))
        img.header["descrip"] = secret_text.encode()
        img.header["aux_file"] = b"DOE_JANE"
        raw = img.to_bytes()
        return gzip.compress(raw[: kw["cut"]] if "cut" in kw else raw)

    caplog.set_level(logging.DEBUG)
    responses = [
        client.post("/v1/segment", files={"file": (secret_name, described())}),
        client.post("/v1/segment/summary", files={"file": (secret_name, described())}),
        client.post("/v1/segment", files={"file": (secret_name, described(cut=360))}),
        client.post("/v1/segment", files={"image": (secret_name, described())}),
    ]
    assert [r.status_code for r in responses] == [200, 200, 422, 422]
    assert "segmented" in caplog.text and "rejected upload" in caplog.text  # the service does log requests
    for text in (caplog.text, *(r.text for r in responses[1:])):
        assert "DOE" not in text and "JANE" not in text and "123456" not in text
