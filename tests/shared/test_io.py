import nibabel as nib
import numpy as np
import pytest

from shared.errors import InvalidVolumeError
from shared.io import load_volume, save_segmentation

AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])


def save(tmp_path, data, affine=AFFINE, klass=nib.Nifti1Image, name="v.nii.gz"):
    path = tmp_path / name
    if abs(np.linalg.det(affine[:3, :3])) > 0:
        nib.save(klass(data, affine), path)
    else:  # nibabel refuses to build a qform from a singular affine: write the sform only
        header = nib.Nifti1Header()
        header.set_data_shape(data.shape)
        header.set_data_dtype(data.dtype)
        header.set_sform(affine, code=1)
        header["qform_code"] = 0
        nib.save(klass(data, None, header=header), path)
    return path


@pytest.mark.parametrize("klass,name", [(nib.Nifti1Image, "v.nii.gz"), (nib.Nifti2Image, "v.nii")])
def test_round_trip_keeps_geometry_and_codes(tmp_path, klass, name):
    img = klass(np.random.rand(6, 7, 5).astype(np.float32), AFFINE)
    img.header.set_qform(AFFINE, code=1)
    img.header.set_sform(AFFINE, code=4)
    nib.save(img, tmp_path / name)
    data, meta = load_volume(tmp_path / name)
    assert data.shape == (6, 7, 5) and meta["spacing"] == (2.0, 2.0, 2.0)
    save_segmentation((data > 0.5).astype(np.uint8), tmp_path / f"seg-{name}", meta)
    out = nib.load(tmp_path / f"seg-{name}")
    assert isinstance(out, klass) and out.shape == (6, 7, 5)
    np.testing.assert_allclose(out.affine, AFFINE)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 4


def test_single_volume_4d_is_accepted(tmp_path):
    data, meta = load_volume(save(tmp_path, np.ones((4, 5, 6, 1), np.float32)))
    assert data.shape == (4, 5, 6)


@pytest.mark.parametrize(
    "data,affine,match",
    [
        (np.ones((4, 5), np.float32), AFFINE, "3-D"),
        (np.ones((4, 5, 6, 2), np.float32), AFFINE, "3-D"),
        (np.ones((4, 0, 6), np.float32), AFFINE, "zero-length"),
        (np.full((4, 5, 6), np.nan, np.float32), AFFINE, "NaN or Inf"),
        (np.ones((4, 5, 6), np.float32), np.diag([1.0, 1.0, 0.0, 1.0]), "affine"),
    ],
)
def test_bad_volumes_get_clear_errors(tmp_path, data, affine, match):
    with pytest.raises(InvalidVolumeError, match=match):
        load_volume(save(tmp_path, data, affine), source="upload")


def test_voxel_limit_is_checked_from_the_header(tmp_path):
    with pytest.raises(InvalidVolumeError, match="exceeds the limit"):
        load_volume(save(tmp_path, np.ones((10, 10, 10), np.float32)), max_voxels=999)


def test_truncated_and_foreign_files(tmp_path):
    path = save(tmp_path, np.random.rand(30, 30, 30).astype(np.float32), name="t.nii")
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(InvalidVolumeError, match="truncated or corrupt"):
        load_volume(path)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InvalidVolumeError, match="not a readable NIfTI"):
        load_volume(junk)
