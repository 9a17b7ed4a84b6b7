"""shared.dicom: a zipped MR series -> (array, RAS affine), every bad series named, and DICOM SEG out."""

from __future__ import annotations

import copy
import io
import struct
import warnings
import zipfile

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from shared.dicom import (
    LPS_TO_RAS,
    ZipLimits,
    build_segmentation,
    make_mr_series,
    read_series_zip,
    segmentation_to_bytes,
    series_to_volume,
    series_to_zip,
)
from shared.errors import InvalidVolumeError
from shared.labels import LABELS

_c, _s = np.cos(0.3), np.sin(0.3)
# Oblique (rotated about z and x), anisotropic, with a flipped axis: nothing lines up with RAS by accident.
OBLIQUE = np.array([[-1.5 * _c, 0, 2.0 * _s, 40], [1.5 * _s, 0, 2.0 * _c, -30], [0, 2.5, 0, -20], [0, 0, 0, 1.0]])


def _volume(shape=(20, 16, 12), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return (200 + 700 * np.exp(-3 * sum(g**2 for g in grid)) + rng.normal(0, 20, shape)).astype(np.float32)


def _zip(tmp_path, datasets, name="series.zip"):
    path = tmp_path / name
    series_to_zip(datasets, path)
    return path


def _expected(datasets, shape) -> np.ndarray:
    """What the stored integers mean, computed from each written slice's own header."""
    out = np.empty(shape)
    for k, ds in enumerate(datasets):
        stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
        out[:, :, k] = (stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).T
    return out


@pytest.mark.parametrize("per_slice", [False, True], ids=["series-rescale", "per-slice-rescale"])
def test_round_trip_keeps_values_and_geometry(tmp_path, per_slice):
    volume = _volume()
    datasets = make_mr_series(volume, OBLIQUE, per_slice_rescale=per_slice)
    shuffled = [datasets[i] for i in np.random.default_rng(1).permutation(len(datasets))]
    image, meta = read_series_zip(_zip(tmp_path, shuffled))
    assert image.dtype == np.float32 and image.shape == volume.shape == meta["shape"]
    np.testing.assert_allclose(meta["affine"], OBLIQUE, atol=1e-5)
    np.testing.assert_allclose(image, _expected(datasets, volume.shape), rtol=1e-6, atol=1e-3)
    step = (volume.max() - volume.min()) / 65535
    assert np.abs(image - volume).max() <= step  # quantisation only
    np.testing.assert_allclose(meta["spacing"], (1.5, 2.5, 2.0), atol=1e-5)
    assert [int(ds.InstanceNumber) for ds in meta["dicom"]] == list(range(1, volume.shape[2] + 1))  # sorted by position
    assert "PixelData" not in meta["dicom"][0]  # headers only are kept
    assert int(meta["header"]["sform_code"]) == 1 and int(meta["header"]["qform_code"]) == 1


@pytest.mark.parametrize("s, b", [(4.0, -300.0), (0.25, 500.0), (0.01, -3.0)])
def test_rescale_is_linear_so_scanner_affines_pass_through(tmp_path, s, b):
    """Rescale tags mapped by s*x+b map the volume by exactly s*x+b: no clipping, no per-slice scaling."""
    datasets = make_mr_series(_volume(), OBLIQUE, per_slice_rescale=True)
    base, _ = series_to_volume(copy.deepcopy(datasets))
    for ds in datasets:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        ds.RescaleSlope, ds.RescaleIntercept = f"{s * slope:.9g}", f"{s * intercept + b:.9g}"
    mapped, _ = series_to_volume(datasets)
    np.testing.assert_allclose(mapped, s * base.astype(np.float64) + b, rtol=1e-5, atol=1e-4 * max(abs(b), 1))


def _small_series(name="MR_small.dcm", n=5) -> list:
    """A stack of pydicom's real MR test image: ``n`` slices along the slice normal, 0.8 mm apart."""
    first = pydicom.dcmread(get_testdata_file(name))
    iop = np.asarray([float(v) for v in first.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    out = []
    for k in range(n):
        ds = copy.deepcopy(first)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [
            f"{v:.4f}" for v in np.asarray([float(v) for v in first.ImagePositionPatient]) + 0.8 * k * normal
        ]
        out.append(ds)
    return out


def test_geometry_matches_nibabels_independent_dicom_reader():
    """nibabel.nicom (its own DICOM geometry code) maps (row, column) indices; ours maps (column, row) to RAS."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nibabel calls its DICOM readers experimental
        from nibabel.nicom import dicomwrappers

    datasets = _small_series()
    _, meta = series_to_volume(copy.deepcopy(datasets))
    reference = dicomwrappers.wrapper_from_data(datasets[0]).affine  # voxel (row, col, .) -> LPS
    ours_lps = np.linalg.inv(LPS_TO_RAS) @ meta["affine"]
    np.testing.assert_allclose(ours_lps[:3, [1, 0]], reference[:3, :2], atol=1e-6)
    np.testing.assert_allclose(ours_lps[:3, 3], reference[:3, 3], atol=1e-6)
    np.testing.assert_allclose(np.abs(ours_lps[:3, 2]), [0, 0, 0.8], atol=1e-6)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_decodable_compressed_series_equal_the_uncompressed_one(name):
    plain, _ = series_to_volume(_small_series())
    compressed, meta = series_to_volume(_small_series(name))
    np.testing.assert_array_equal(compressed, plain)
    assert meta["shape"] == (64, 64, 5)


def _drop(datasets, k):
    return [ds for i, ds in enumerate(datasets) if i != k]


def _mixed(datasets):
    other = make_mr_series(_volume((20, 16, 3), seed=2), OBLIQUE)
    return datasets + other


def _duplicate_position(datasets):
    extra = copy.deepcopy(datasets[3])
    extra.SOPInstanceUID = generate_uid()
    return datasets + [extra]


def _uneven(datasets):
    lps = np.linalg.inv(LPS_TO_RAS) @ OBLIQUE
    for k, ds in enumerate(datasets):
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, 3] + (k + 0.3 * (k > 5)) * lps[:3, 2]]
    return datasets


def _non_image(datasets):
    report = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    return datasets + [report]


def _undecodable(datasets):
    for ds in datasets:
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"  # JPEG Lossless SV1: no decoder installed here
        ds.PixelData = encapsulate([ds.PixelData])  # refused from the header, before any frame is decoded
    return datasets


def _ct(datasets):
    datasets[2].Modality = "CT"
    return datasets


def _shifted_in_plane(datasets):
    lps = np.linalg.inv(LPS_TO_RAS) @ OBLIQUE
    ds = datasets[4]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, 3] + 4 * lps[:3, 2] + 5 * lps[:3, 0]]
    return datasets


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_mixed, r"2 series mixed \(12, 3 instances\); send one series"),
        (lambda d: _drop(d, 6), r"missing slices: 1 slice\(s\) absent .*after slice 5 of 11"),
        (lambda d: d + [d[2]], r"duplicate slices: 2 copies of the same instance"),
        (_duplicate_position, r"duplicate slices: 2 slices share a position"),
        (_uneven, r"non-uniform slice spacing \(2 to 2.6 mm\)"),
        (_non_image, r"zip entry 12 is not an image \(Comprehensive SR Storage, no pixel data\)"),
        (
            _undecodable,
            r"compressed transfer syntax 'JPEG Lossless, Non-Hierarchical, First-Order Prediction.*cannot decode",
        ),
        (_ct, r"zip entry 2 has modality 'CT'; expected MR"),
        (_shifted_in_plane, r"slice positions do not lie on one line"),
        (lambda d: d[:1], r"a series of 1 slice is 2-D"),
    ],
    ids=[
        "mixed",
        "missing",
        "duplicate-instance",
        "duplicate-position",
        "uneven",
        "non-image",
        "undecodable",
        "ct",
        "not-a-stack",
        "one-slice",
    ],
)
def test_bad_series_are_named(tmp_path, corrupt, message):
    datasets = corrupt(make_mr_series(_volume(), OBLIQUE))
    with pytest.raises(InvalidVolumeError, match=message):
        read_series_zip(_zip(tmp_path, datasets))


def _raw_zip(tmp_path, members: dict[str, bytes], name="x.zip"):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return path


def test_zip_checks_come_before_inflating(tmp_path):
    dcm = segmentation_to_bytes(make_mr_series(_volume(), OBLIQUE)[0])
    with pytest.raises(InvalidVolumeError, match=r"holds 5 files, more than the limit of 4"):
        read_series_zip(_raw_zip(tmp_path, {f"{k}.dcm": dcm for k in range(5)}), limits=ZipLimits(max_entries=4))
    with pytest.raises(InvalidVolumeError, match=r"declares \d+ bytes uncompressed, more than the limit"):
        read_series_zip(_raw_zip(tmp_path, {"a.dcm": dcm}), limits=ZipLimits(max_voxels=10, header_bytes=100))
    with pytest.raises(InvalidVolumeError, match=r"compression ratio above 1000 \(zip bomb\?\)"):
        read_series_zip(_raw_zip(tmp_path, {"a.dcm": b"\0" * (20 * 1024 * 1024)}))
    with pytest.raises(InvalidVolumeError, match=r"no files"):
        read_series_zip(_raw_zip(tmp_path, {}))
    with pytest.raises(InvalidVolumeError, match=r"zip entry 1 is not a DICOM file"):
        read_series_zip(_raw_zip(tmp_path, {"a.dcm": dcm, "notes.txt": b"hello"}))
    with pytest.raises(InvalidVolumeError, match=r"the series has 3840 voxels, more than the limit of 3000"):
        read_series_zip(_zip(tmp_path, make_mr_series(_volume(), OBLIQUE)), limits=ZipLimits(max_voxels=3000))
    with pytest.raises(InvalidVolumeError, match=r"corrupt zip archive"):
        (tmp_path / "t.zip").write_bytes(b"PK\x03\x04" + b"\0" * 100)
        read_series_zip(tmp_path / "t.zip")


def test_entry_that_inflates_beyond_its_declared_size_is_refused(tmp_path):
    """A zip bomb that lies in its headers: declared 1000 bytes, really 20 MiB."""
    path = _raw_zip(tmp_path, {"a.dcm": b"\0" * (20 * 1024 * 1024)})
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, data.rfind(b"PK\x01\x02") + 24, 1000)  # central directory: uncompressed size
    struct.pack_into("<I", data, 22, 1000)  # local header: uncompressed size
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidVolumeError, match=r"zip entry 0 cannot be read"):
        read_series_zip(path)


def test_error_messages_carry_no_identifiers(tmp_path):
    datasets = make_mr_series(_volume(), OBLIQUE, patient_name="Doe^Jane", patient_id="PID-4711")
    with pytest.raises(InvalidVolumeError) as info:
        read_series_zip(_zip(tmp_path, _mixed(datasets)))
    text = str(info.value)
    for secret in ("Doe", "PID-4711", datasets[0].SeriesInstanceUID, datasets[0].StudyInstanceUID, "IM000"):
        assert secret not in text


def test_segmentation_reads_back_voxel_by_voxel_with_snomed_codes(tmp_path):
    import highdicom as hd

    volume = _volume()
    extra = {
        "PatientAddress": "1 Main Street",
        "OtherPatientIDs": "OTHER-99",
        "InstitutionName": "General Hospital",
        "PatientAge": "042Y",
        "PatientComments": "secret",
    }
    datasets = make_mr_series(volume, OBLIQUE, patient_name="Doe^Jane", patient_id="PID-4711", extra=extra)
    _, meta = read_series_zip(_zip(tmp_path, datasets))
    labels = np.random.default_rng(0).integers(0, 4, volume.shape).astype(np.uint8)
    labels[..., 0] = 0  # an empty slice still gets its frames
    seg = hd.seg.segread(io.BytesIO(segmentation_to_bytes(build_segmentation(labels, meta["dicom"], "tiny"))))

    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    source_uids = [ds.SOPInstanceUID for ds in datasets]
    assert {uid for _, _, uid in seg.get_source_image_uids()} == set(source_uids)
    frames = seg.get_pixels_by_source_instance(source_uids, combine_segments=True, relabel=False)
    for k in range(len(source_uids)):  # make_mr_series slice k is voxel plane k
        expected = np.where(labels[:, :, k].T > 0, labels[:, :, k].T, 0)
        np.testing.assert_array_equal(frames[k], expected)
    described = {
        int(d.SegmentNumber): (d.SegmentLabel, d.SegmentedPropertyTypeCodeSequence[0]) for d in seg.SegmentSequence
    }
    assert {n: label for n, (label, _) in described.items()} == {k: LABELS[k] for k in (1, 2, 3)}
    assert {n: (c.CodingSchemeDesignator, c.CodeValue) for n, (_, c) in described.items()} == {
        1: ("SCT", "389081007"),
        2: ("SCT", "389080008"),
        3: ("SCT", "52988006"),
    }
    # Only what the SEG IOD requires of the patient is copied; nothing else from the source header.
    assert str(seg.PatientName) == "Doe^Jane" and seg.PatientID == "PID-4711"
    for keyword in extra:
        assert keyword not in seg
