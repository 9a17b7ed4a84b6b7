"""POST /v1/segment and /v1/segment/summary: geometry of the returned file, segmentation quality, JSON."""

from __future__ import annotations

import base64
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shared.data import DataConfig, make_eval_dataset
from shared.registry import load_model
from shared.training import predict_labels

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
LPS_ANISO = np.array([[-1.2, 0, 0, 30], [0, 0, 3.0, -40], [0, -2.0, 0, 25], [0, 0, 0, 1]])
_c, _s = np.cos(0.3), np.sin(0.3)
OBLIQUE = np.array([[2 * _c, -2 * _s, 0, -20], [2 * _s, 2 * _c, 0, 10], [0, 0, 3.5, 5], [0, 0, 0, 1]])


def _assert_same_grid(out: nib.Nifti1Image, inp: nib.Nifti1Image) -> None:
    """Shape, affine, NIfTI version, and each coded qform/sform with its code."""
    assert type(out) is type(inp)
    assert out.shape == inp.shape
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, inp.affine, atol=1e-5)
    for getter in ("get_qform", "get_sform"):
        m_out, code_out = getattr(out.header, getter)(coded=True)
        m_in, code_in = getattr(inp.header, getter)(coded=True)
        assert code_out == code_in, getter
        if code_in:
            np.testing.assert_allclose(m_out, m_in, atol=1e-5)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


@pytest.mark.parametrize(
    "version, gz, codes, affine",
    [
        (1, True, (1, 1), LPS_ANISO),
        (1, False, (2, 0), OBLIQUE),
        (1, True, (0, 4), np.diag([3.0, 3.0, 3.0, 1.0])),
        (2, True, (1, 2), LPS_ANISO),
        (2, False, (0, 1), OBLIQUE),
    ],
    ids=["nifti1-gz-lps", "nifti1-raw-oblique-qform-only", "nifti1-gz-sform-only", "nifti2-gz-lps",
         "nifti2-raw-oblique"],
)
def test_returned_label_map_has_the_input_grid(client, nifti_bytes, read_nifti, phantom, version, gz, codes, affine):
    content = nifti_bytes(phantom((26, 18, 12)), affine, version=version, gz=gz, qform_code=codes[0],
                          sform_code=codes[1])
    response = client.post("/v1/segment", files={"file": ("scan.nii.gz" if gz else "scan.nii", content)})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    assert response.headers["x-model-version"] == "tiny"
    assert "inference;dur=" in response.headers["server-timing"]
    _assert_same_grid(read_nifti(response.content), read_nifti(content))


@pytest.mark.parametrize("name", ["anatomical.nii", "standard.nii.gz"])
def test_foreign_nibabel_files(client, read_nifti, name):
    """Real files from nibabel's test data: big-endian int16 LAS (qform/sform 2), and a 4x5x7 sform-only volume."""
    content = (NIBABEL_DATA / name).read_bytes()
    response = client.post("/v1/segment", files={"file": (name, content)})
    assert response.status_code == 200, response.text
    _assert_same_grid(read_nifti(response.content), read_nifti(content))


@pytest.mark.parametrize("name, klass",
                         [("example4d.nii.gz", nib.Nifti1Image), ("example_nifti2.nii.gz", nib.Nifti2Image)])
def test_single_volume_4d_is_accepted_and_keeps_its_shape(client, read_nifti, tmp_path, name, klass):
    source = nib.load(NIBABEL_DATA / name)
    single = klass(np.asanyarray(source.dataobj)[..., :1], source.affine, source.header)
    path = tmp_path / name
    nib.save(single, path)
    response = client.post("/v1/segment", files={"file": (name, path.read_bytes())})
    assert response.status_code == 200, response.text
    out = read_nifti(response.content)
    assert out.shape == single.shape and out.shape[3] == 1
    _assert_same_grid(out, nib.load(path))
    # The full two-volume file is refused.
    response = client.post("/v1/segment", files={"file": (name, (NIBABEL_DATA / name).read_bytes())})
    assert response.status_code == 422 and "4-D with one volume" in response.json()["detail"]


def test_served_model_segments_a_site_test_image(client, site_case, api_registry, read_nifti):
    """Grey and white matter of a held-out subject overlap the truth, far above the untrained version."""
    image_path, label_path = site_case
    truth = np.asarray(nib.load(label_path).dataobj)
    dice = {}
    for version in ("tiny", "tiny-untrained"):
        response = client.post(f"/v1/segment?model={version}", files={"file": ("case.nii.gz", image_path.read_bytes())})
        assert response.status_code == 200 and response.headers["x-model-version"] == version
        labels = np.asarray(read_nifti(response.content).dataobj)
        dice[version] = {k: _dice(labels == k, truth == k) for k in (1, 2)}
    assert dice["tiny"][1] > 0.5 and dice["tiny"][2] > 0.5, dice
    assert min(dice["tiny"].values()) > max(dice["tiny-untrained"].values()) + 0.2, dice


def test_rest_matches_in_process_inference(client, site_case, api_registry, read_nifti):
    """The service preprocesses exactly as training: same labels as the shared evaluation path."""
    image_path, label_path = site_case
    model, meta = load_model(api_registry, "tiny")
    cfg = DataConfig(**meta["data_config"])
    item = make_eval_dataset([{"image": str(image_path), "label": str(label_path)}], cfg)[0]
    expected = predict_labels(model, item["image"], cfg.roi_size).numpy()
    response = client.post("/v1/segment", files={"file": ("case.nii.gz", image_path.read_bytes())})
    labels = np.asarray(read_nifti(response.content).dataobj)
    assert labels.shape == expected.shape  # 4 mm site data on the 4 mm model grid: no resampling
    assert (labels == expected).mean() > 0.999


def test_scanner_intensity_map_does_not_change_the_answer(client, site_case, nifti_bytes, read_nifti):
    """s*x + b on the upload leaves the label map unchanged: no zero enters before instance norm."""
    image_path, _ = site_case
    img = nib.load(image_path)
    data = img.get_fdata(dtype=np.float32)
    answers = []
    for scale, shift in ((1.0, 0.0), (3.5, 250.0), (0.2, -40.0)):
        content = nifti_bytes((scale * data + shift).astype(np.float32), img.affine)
        response = client.post("/v1/segment", files={"file": ("case.nii.gz", content)})
        answers.append(np.asarray(read_nifti(response.content).dataobj))
    for other in answers[1:]:
        assert (other == answers[0]).mean() > 0.999


def test_summary_reports_volumes_geometry_and_timings(client, nifti_bytes, read_nifti, phantom):
    content = nifti_bytes(phantom((26, 18, 12)), LPS_ANISO, version=2, qform_code=1, sform_code=2)
    labels = np.asarray(read_nifti(client.post("/v1/segment", files={"file": ("a.nii.gz", content)}).content).dataobj)
    response = client.post("/v1/segment/summary", files={"file": ("a.nii.gz", content)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "tiny"
    assert body["input"] == {"shape": [26, 18, 12], "spacing_mm": [1.2, 2.0, 3.0], "orientation": "LIA",
                             "nifti_version": 2, "qform_code": 1, "sform_code": 2}
    voxel_ml = 1.2 * 3.0 * 2.0 / 1000
    by_name = {v["name"]: v for v in body["labels"]}
    assert set(by_name) == {"grey matter", "white matter", "lesion"}
    for v in body["labels"]:
        assert v["voxels"] == int((labels == v["label"]).sum())
        assert v["ml"] == pytest.approx(v["voxels"] * voxel_ml, abs=1e-4)
        assert body["volumes_ml"][v["name"]] == pytest.approx(v["ml"])
    timings = body["timings"]
    assert set(timings) == {"upload_s", "read_s", "preprocess_s", "inference_s", "postprocess_s", "total_s"}
    assert all(t >= 0 for t in timings.values()) and timings["total_s"] >= timings["inference_s"]
    assert body["preview"] is None


def test_summary_preview_carries_the_same_label_map(client, nifti_bytes, read_nifti, phantom):
    content = nifti_bytes(phantom((26, 18, 12)), OBLIQUE)
    direct = np.asarray(read_nifti(client.post("/v1/segment", files={"file": ("a.nii.gz", content)}).content).dataobj)
    body = client.post("/v1/segment/summary?preview=true", files={"file": ("a.nii.gz", content)}).json()
    embedded = read_nifti(base64.b64decode(body["preview"]["segmentation_nii_gz"]))
    np.testing.assert_array_equal(np.asarray(embedded.dataobj), direct)
    planes = {s["plane"]: s for s in body["preview"]["slices"]}
    assert set(planes) == {"sagittal", "coronal", "axial"}
    for s in planes.values():
        assert len(base64.b64decode(s["image"])) == len(base64.b64decode(s["labels"])) == s["width"] * s["height"]


def test_unknown_model_version(client, nifti_bytes, phantom):
    content = nifti_bytes(phantom(), np.eye(4))
    response = client.post("/v1/segment?model=no-such-model", files={"file": ("a.nii.gz", content)})
    assert response.status_code == 404
    assert response.json()["detail"] == "model version 'no-such-model' not found in the registry"
    response = client.post("/v1/segment?model=../../etc", files={"file": ("a.nii.gz", content)})
    assert response.status_code == 422


def test_gzip_with_several_members(client, nifti_bytes, read_nifti, phantom):
    """Concatenated gzip members are one valid .gz stream (as `cat a.gz b.gz` makes)."""
    raw = nifti_bytes(phantom(), np.eye(4), gz=False)
    content = gzip.compress(raw[:1000]) + gzip.compress(raw[1000:])
    response = client.post("/v1/segment", files={"file": ("a.nii.gz", content)})
    assert response.status_code == 200, response.text
    assert read_nifti(response.content).shape == phantom().shape
