"""Header validation and the work budget, on real NIfTI bytes (nibabel's own test files and synthesized ones)."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from server.api.budget import LimitExceededError, WorkBudget, model_grid_shape, window_count
from server.api.header import check_header
from server.api.inference import preprocessing
from shared.data import DataConfig
from shared.errors import InvalidVolumeError

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
LPS = np.array([[-1.2, 0, 0, 30], [0, 0, 3.0, -40], [0, -2.0, 0, 25], [0, 0, 0, 1]])
_c, _s = np.cos(0.3), np.sin(0.3)
OBLIQUE = np.array([[2 * _c, -2 * _s, 0, -20], [2 * _s, 2 * _c, 0, 10], [0, 0, 3.5, 5], [0, 0, 0, 1]])
SHEARED = np.array([[2.0, 0.5, 0, 1], [0, 2.0, 0.3, 2], [0.2, 0, 3.0, 3], [0, 0, 0, 1]])
BIG = 10**12


def _header(version: int = 1, affine=LPS, shape=(20, 16, 12)) -> nib.Nifti1Header:
    klass = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    img = klass(np.zeros(shape, np.float32), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header["vox_offset"] = img.header.single_vox_offset
    return img.header


def _bytes(hdr: nib.Nifti1Header) -> bytes:
    return hdr.binaryblock + b"\0\0\0\0"


def _check(hdr: nib.Nifti1Header):
    return check_header(_bytes(hdr), "upload", BIG)


def _set(hdr, field, value, index=None):
    if index is None:
        hdr[field] = value
    else:
        hdr[field][index] = value
    return hdr


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    "field, index, value, message",
    [
        ("dim", 0, 9, "dim[0] (number of dimensions) is 9"),
        ("dim", 0, 0, "dim[0] (number of dimensions) is 0"),
        ("dim", 2, -4, "negative dimension"),
        ("datatype", None, 999, "unknown data type code 999 (datatype)"),
        ("datatype", None, 32, "unsupported voxel type"),  # complex64
        ("vox_offset", None, np.nan, "vox_offset is not a finite number"),
        ("vox_offset", None, 0, "vox_offset 0 is inside the header"),
        ("scl_inter", None, np.inf, "scl_inter is not finite"),
    ],
)
def test_unusable_field_is_named(version, field, index, value, message):
    hdr = _header(version)
    if field == "vox_offset" and value != value and version == 2:
        pytest.skip("NIfTI-2's vox_offset is an integer")
    if field == "scl_inter":
        hdr["scl_slope"] = 2.0
    with pytest.raises(InvalidVolumeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        _check(_set(hdr, field, value, index))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    "mutate, field_named",
    [
        (lambda h: _set(h, "quatern_b", 0.9) and _set(h, "quatern_c", 0.9), "quaternion norm"),
        (lambda h: _set(h, "quatern_d", np.nan), "quatern_b/c/d is not finite"),
        (lambda h: _set(h, "qoffset_y", np.inf), "qoffset_x/y/z is not finite"),
        (lambda h: _set(h, "pixdim", 0.0, 2), "pixdim[1..3] must be finite and non-zero"),
        (lambda h: _set(h, "pixdim", np.nan, 3), "pixdim[1..3] must be finite and non-zero"),
    ],
)
def test_broken_qform_falls_back_to_the_sform(version, mutate, field_named):
    hdr = mutate(_header(version))
    checked = _check(hdr)
    np.testing.assert_allclose(checked.affine, LPS, atol=1e-5)
    assert any(w.startswith("qform ignored") and field_named in w for w in checked.warnings), checked.warnings
    # The qform is rewritten from the sform, its code kept: the output header is valid throughout.
    qform, code = checked.header.get_qform(coded=True)
    assert code == 1
    np.testing.assert_allclose(qform, LPS, atol=1e-4)
    assert np.all(np.asarray(checked.header.get_zooms()[:3]) > 0)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    "srow, value, problem",
    [("srow_x", [np.nan, 0, 0, 0], "non-finite"), ("srow_y", [0, 0, 0, 0], "not invertible"),
     ("srow_z", [1e30, 0, 0, 0], "out of range"), ("srow_x", [1, 1e-7, 0, 0], "not decomposable")],
)
def test_broken_sform_falls_back_to_the_qform(version, srow, value, problem):
    hdr = _header(version)
    if problem == "not decomposable":  # a nearly flat grid: columns almost parallel but det above the floor
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [1e3, 1e3, 0, 0], [1e3, 1e3 + 1e-3, 0, 0], [0, 0, 1, 0]
    else:
        hdr[srow] = value
    checked = _check(hdr)
    np.testing.assert_allclose(checked.affine, LPS, atol=1e-4)
    assert any(w.startswith("sform ignored") and problem in w for w in checked.warnings), checked.warnings
    sform, code = checked.header.get_sform(coded=True)
    assert code == 1
    np.testing.assert_allclose(sform, LPS, atol=1e-4)


def test_qform_rewritten_from_a_rotated_sform_reads_back():
    """Found by Hypothesis: nibabel's set_qform can store a NIfTI-2 quaternion it then refuses to read."""
    sform = np.array([[-2.0, 6.714715653593746e-19, 9.081024511081715e-18, 117.8551025390625],
                      [-6.714715653593746e-19, 1.9737114906311035, -0.35552823543548584, -35.72294235229492],
                      [8.25548088896093e-18, 0.3232076168060303, 2.171081781387329, -7.248798370361328],
                      [0, 0, 0, 1]])
    hdr = _header(2, affine=sform)
    hdr["pixdim"][1] = 0.0  # breaks the qform: it is rewritten from the sform
    checked = _check(hdr)
    assert any(w.startswith("qform ignored") for w in checked.warnings), checked.warnings
    qform, code = checked.header.get_qform(coded=True)  # what save_segmentation calls
    assert code == 1
    np.testing.assert_allclose(qform, sform, atol=1e-4)  # the 1e-12 shrink turns it by ~3e-6 rad


def test_both_forms_broken_is_422_naming_both():
    hdr = _header()
    hdr["quatern_b"], hdr["srow_x"] = np.nan, [np.inf, 0, 0, 0]
    with pytest.raises(InvalidVolumeError, match="quatern_b/c/d is not finite and sform .* non-finite"):
        _check(hdr)


@pytest.mark.parametrize(
    "mutate, warning",
    [
        (lambda h: _set(h, "qform_code", 17), "qform_code 17 is not a NIfTI code"),
        (lambda h: _set(h, "sform_code", -3), "sform_code -3 is not a NIfTI code"),
        (lambda h: _set(h, "pixdim", -2.0, 1), "negative pixdim"),
        (lambda h: _set(h, "pixdim", 0.5, 0), "qfac pixdim[0] is 0.5"),
        (lambda h: _set(h, "scl_slope", -np.inf), "scl_slope is infinite"),
        (lambda h: _set(h, "xyzt_units", 7), "xyzt_units code 7 unknown"),
        (lambda h: _set(h, "bitpix", 3), "bitpix 3 does not match"),
    ],
)
def test_recoverable_fields_are_recovered_as_nibabel_does(mutate, warning):
    checked = _check(mutate(_header()))
    assert any(warning in w for w in checked.warnings), checked.warnings
    assert np.all(np.isfinite(checked.affine))
    # What nibabel itself makes of the repaired header agrees with the affine we use.
    repaired = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(checked.header.binaryblock))
    np.testing.assert_allclose(repaired.get_best_affine(), checked.affine, atol=1e-5)


def test_no_codes_uses_pixdim_and_needs_it_valid():
    hdr = _header()
    hdr["qform_code"] = hdr["sform_code"] = 0
    assert np.allclose(np.abs(np.diag(_check(hdr).affine))[:3], [1.2, 2.0, 3.0], atol=1e-5)
    hdr["pixdim"][2] = np.inf
    with pytest.raises(InvalidVolumeError, match=r"pixdim\[1..3\] must be finite and non-zero \(no qform or sform\)"):
        _check(hdr)


@pytest.mark.parametrize("name", ["anatomical.nii", "standard.nii.gz"])
def test_real_files_pass_unchanged(name):
    raw = (NIBABEL_DATA / name).read_bytes()
    if name.endswith(".gz"):
        import gzip

        raw = gzip.decompress(raw)
    checked = check_header(raw[:544], "upload", BIG)
    img = nib.load(NIBABEL_DATA / name)
    assert checked.warnings == [] and checked.shape == img.shape
    np.testing.assert_allclose(checked.affine, img.affine)


def test_nifti2_dims_cannot_wrap_the_voxel_count():
    hdr = _header(2)
    hdr["dim"][1:4] = [2**40, 2**40, 2**40]  # int64 product wraps; Python's does not
    with pytest.raises(InvalidVolumeError, match="header claims 1329227995784915872903807060280344576 voxels"):
        check_header(_bytes(hdr), "upload", 512**3)


# --- the work budget ---------------------------------------------------------------------


@pytest.mark.parametrize("affine",
                         [LPS, OBLIQUE, SHEARED, np.diag([24.0, 24.0, 24.0, 1.0]), np.diag([0.7, 0.9, 1.1, 1.0])],
                         ids=["lps", "oblique", "sheared", "24mm", "fine"])
@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (4.0, 3.0, 2.5)])
def test_model_grid_shape_is_monai_s(affine, spacing):
    """The shape predicted from the header is the shape preprocessing really produces."""
    shape = (13, 9, 7)
    cfg = DataConfig(spacing=spacing, roi_size=(16, 16, 16))
    from monai.data import MetaTensor

    volume = MetaTensor(torch.zeros(shape), affine=torch.as_tensor(affine), meta={"original_channel_dim": "no_channel"})
    prepared = preprocessing(cfg)({"image": volume})["image"]
    assert model_grid_shape(shape, affine, spacing) == tuple(float(n) for n in prepared.shape[1:])


@pytest.mark.parametrize("roi", [8, 32, 64])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_window_count_is_monai_s(roi, overlap):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for size in (1, roi - 1, roi, roi + 1, 2 * roi + 3, 5 * roi):
        image = (max(size, roi),)
        interval = _get_scan_interval(image, (roi,), 1, (overlap,))
        expected = len(dense_patch_slices(image, (roi,), interval))
        assert window_count(size, roi, overlap) == expected, (size, roi, overlap)


def test_budget_refuses_the_coarse_voxel_amplification():
    """48^3 voxels declaring 24 mm: 565^3 on a 2 mm grid, refused from the numbers alone."""
    budget = WorkBudget(max_voxels=512**3, max_model_voxels=256**3, max_window_voxels=4 * 256**3)
    with pytest.raises(LimitExceededError) as info:
        budget.check((48, 48, 48), np.diag([24.0, 24.0, 24.0, 1.0]), (2.0, 2.0, 2.0), (64, 64, 64))
    assert info.value.limit == "FEDMRI_MAX_MODEL_VOXELS"
    assert info.value.value == 565**3 and info.value.maximum == 256**3  # (48 - 1) * 12 + 1 voxels per axis
    assert "565x565x565" in str(info.value)
    cost = budget.check((182, 218, 182), np.diag([1.0, 1.0, 1.0, 1.0]), (2.0, 2.0, 2.0), (64, 64, 64))
    assert cost.model_shape == (92.0, 110.0, 92.0) and cost.windows == 8


def test_budget_bounds_the_sliding_window_work():
    budget = WorkBudget(max_voxels=512**3, max_model_voxels=256**3, max_window_voxels=10**6, overlap=0.9)
    with pytest.raises(LimitExceededError) as info:
        budget.check((64, 64, 64), np.eye(4), (1.0, 1.0, 1.0), (32, 32, 32))
    assert info.value.limit == "FEDMRI_MAX_WINDOW_VOXELS" and info.value.value > 10**6


def test_budget_survives_absurd_numbers():
    budget = WorkBudget(max_voxels=512**3, max_model_voxels=256**3, max_window_voxels=4 * 256**3)
    with pytest.raises(LimitExceededError) as info:
        budget.check((4, 4, 4), np.diag([1e6, 1e6, 1e6, 1.0]), (0.5, 0.5, 0.5), (32, 32, 32))
    assert info.value.value is None or math.isfinite(info.value.value)
