"""POST /v1/segment with a zipped DICOM series: the NIfTI path's answer, DICOM SEG out, bad series as 422."""

from __future__ import annotations

import io
import logging

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest

from shared.dicom import LPS_TO_RAS, make_mr_series, series_to_zip

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def site_series(site_case):
    """site-b's test subject (scanner 4x - 300) as an MR series, with extra identifiers that must not leak."""
    img = nib.load(site_case[0])
    volume = np.asarray(img.dataobj, dtype=np.float32)
    datasets = make_mr_series(
        volume,
        img.affine,
        per_slice_rescale=True,
        patient_name="Doe^Jane",
        patient_id="PID-4711",
        extra={"PatientAddress": "1 Main Street", "InstitutionName": "General Hospital"},
    )
    return volume, img.affine, datasets


def _post(client, content: bytes, **params):
    return client.post("/v1/segment", params=params, files={"file": ("series.zip", content, "application/zip")})


def test_series_gets_the_nifti_paths_answer(client, site_series, nifti_bytes, read_nifti):
    volume, affine, datasets = site_series
    response = _post(client, series_to_zip(datasets))
    assert response.status_code == 200, response.text
    out = read_nifti(response.content)
    assert out.shape == volume.shape
    np.testing.assert_allclose(out.affine, affine, atol=1e-4)
    # The same voxels as NIfTI: only the 16-bit quantisation of the series may move a label.
    reference = read_nifti(
        client.post("/v1/segment", files={"file": ("v.nii.gz", nifti_bytes(volume, affine))}).content
    )
    agreement = float((np.asarray(out.dataobj) == np.asarray(reference.dataobj)).mean())
    assert agreement > 0.995, agreement
    assert np.isin(np.asarray(out.dataobj), [1, 2]).mean() > 0.1  # the tiny model finds tissue


def test_summary_describes_the_series_geometry(client, site_series):
    volume, affine, datasets = site_series
    response = client.post("/v1/segment/summary", files={"file": ("series.zip", series_to_zip(datasets))})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["input"]["shape"] == list(volume.shape)
    assert body["input"]["orientation"] == "".join(nib.aff2axcodes(affine))
    assert body["volumes_ml"]["grey matter"] > 0


@pytest.mark.parametrize("s, b", [(0.25, 500.0), (7.0, -2000.0)])
def test_scanner_affine_in_rescale_tags_does_not_change_the_labels(client, site_series, read_nifti, s, b):
    """The same stored pixels with RescaleSlope/Intercept mapped by s*x+b: label agreement 1.0000."""
    _, _, datasets = site_series
    base = read_nifti(_post(client, series_to_zip(datasets)).content)
    mapped = []
    for ds in datasets:
        ds = ds.copy()
        ds.RescaleSlope = f"{s * float(ds.RescaleSlope):.9g}"
        ds.RescaleIntercept = f"{s * float(ds.RescaleIntercept) + b:.9g}"
        mapped.append(ds)
    out = read_nifti(_post(client, series_to_zip(mapped)).content)
    assert float((np.asarray(out.dataobj) == np.asarray(base.dataobj)).mean()) == 1.0


def test_dicom_seg_equals_the_nifti_result_voxel_by_voxel(client, site_series, read_nifti, caplog):
    _, _, datasets = site_series
    content = series_to_zip(datasets)
    caplog.set_level(logging.DEBUG)
    nifti = read_nifti(_post(client, content).content)
    response = _post(client, content, format="dicom-seg")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    assert response.headers["x-model-version"] == "tiny"
    seg = hd.seg.segread(io.BytesIO(response.content))
    assert seg.SOPClassUID == SEG_CLASS
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID

    labels = np.asarray(nifti.dataobj)
    inverse = np.linalg.inv(nifti.affine)
    uids = [ds.SOPInstanceUID for ds in datasets]
    frames = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)
    numbers = {int(d.SegmentNumber): d.SegmentLabel for d in seg.SegmentSequence}
    names = {1: "grey matter", 2: "white matter", 3: "lesion"}
    to_label = np.zeros(max(numbers) + 1, np.uint8)
    for number, name in numbers.items():
        to_label[number] = next(k for k, v in names.items() if v == name)
    for ds, frame in zip(datasets, frames, strict=True):
        # Where this instance lies in the NIfTI result, from its own DICOM position (LPS -> RAS).
        position = LPS_TO_RAS @ np.array([*map(float, ds.ImagePositionPatient), 1.0])
        i, j, k = np.rint(inverse @ position)[:3].astype(int)
        assert (i, j) == (0, 0)
        np.testing.assert_array_equal(to_label[frame], labels[:, :, k].T)
    # Identifiers beyond what the SEG needs are not copied, and none reach the log.
    assert "PatientAddress" not in seg and "InstitutionName" not in seg
    for secret in ("Doe", "PID-4711", "Main Street", "General Hospital", datasets[0].StudyInstanceUID):
        assert secret not in caplog.text


def test_dicom_seg_needs_a_dicom_upload(client, nifti_bytes, phantom):
    response = client.post(
        "/v1/segment",
        params={"format": "dicom-seg"},
        files={"file": ("v.nii.gz", nifti_bytes(phantom(), np.diag([3.0, 3, 3, 1])))},
    )
    assert response.status_code == 422
    assert "format=dicom-seg needs a DICOM series" in response.json()["detail"]


def test_bad_series_is_a_422_that_names_the_problem(client, site_series, caplog):
    _, _, datasets = site_series
    caplog.set_level(logging.DEBUG)
    missing = series_to_zip(datasets[:5] + datasets[6:])
    response = _post(client, missing)
    assert response.status_code == 422
    assert response.json()["detail"].startswith("upload: missing slices: 1 slice(s) absent")
    other = make_mr_series(np.ones((8, 8, 3), np.float32), np.diag([2.0, 2, 2, 1]), patient_name="Roe^Richard")
    response = _post(client, series_to_zip(datasets + other))
    assert response.status_code == 422
    assert "2 series mixed" in response.json()["detail"]
    assert "Doe" not in caplog.text and "Roe" not in caplog.text


def test_zip_over_the_voxel_limit_is_refused_before_decoding(make_client, site_series):
    _, _, datasets = site_series
    client = make_client(max_voxels=10_000)
    response = _post(client, series_to_zip(datasets))
    assert response.status_code == 422
    assert "more than the limit" in response.json()["detail"]
