"""NIfTI reading and writing with validation, in the spirit of nnU-Net's ``NibabelIO``.

Every error is an :class:`InvalidVolumeError` whose message names the source (a file name,
or ``"upload"`` for the API) and what is wrong, never voxel data or header text.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from shared.errors import InvalidVolumeError

__all__ = ["SUPPORTED_ENDINGS", "is_nifti_path", "load_nifti", "check_image_header", "load_volume", "save_segmentation"]

SUPPORTED_ENDINGS = (".nii", ".nii.gz")


def is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith(SUPPORTED_ENDINGS)


def load_nifti(path: str | Path, source: str | None = None) -> nib.Nifti1Image | nib.Nifti2Image:
    """Open a NIfTI-1/2 file lazily (header only); raise a clear error for anything else."""
    source = source or Path(path).name
    if not Path(path).is_file():
        raise InvalidVolumeError(f"{source}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for corrupt input
        raise InvalidVolumeError(f"{source}: not a readable NIfTI file ({type(exc).__name__})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InvalidVolumeError(f"{source}: expected a NIfTI-1 or NIfTI-2 image, got {type(img).__name__}")
    return img


def check_image_header(img: nib.Nifti1Image, source: str, max_voxels: int | None = None) -> tuple[int, int, int]:
    """Validate shape and affine from the header alone, before any voxel is read.

    Accepts 3-D volumes and 4-D volumes with a single time point; returns the 3-D shape.
    """
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InvalidVolumeError(f"{source}: expected a 3-D volume (or 4-D with one volume), got shape {shape}")
    if min(shape) < 1:
        raise InvalidVolumeError(f"{source}: zero-length dimension in shape {shape}")
    if max_voxels is not None and int(np.prod(shape, dtype=np.int64)) > max_voxels:
        raise InvalidVolumeError(
            f"{source}: {int(np.prod(shape, dtype=np.int64))} voxels exceeds the limit of {max_voxels}"
        )
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InvalidVolumeError(f"{source}: affine is not invertible")
    return shape  # type: ignore[return-value]


def load_volume(
    path: str | Path, source: str | None = None, max_voxels: int | None = None, dtype: type = np.float32
) -> tuple[np.ndarray, dict]:
    """Read a 3-D NIfTI volume as ``(array, meta)``; ``meta`` holds affine, header, shape and spacing."""
    source = source or Path(path).name
    img = load_nifti(path, source)
    shape = check_image_header(img, source, max_voxels)
    try:
        data = np.asarray(img.dataobj, dtype=dtype).reshape(shape)
    except Exception as exc:  # truncated file, corrupt gzip stream, bad scaling
        raise InvalidVolumeError(
            f"{source}: voxel data could not be read ({type(exc).__name__}: file truncated or corrupt?)"
        ) from None
    if not np.all(np.isfinite(data)):
        raise InvalidVolumeError(f"{source}: contains NaN or Inf voxels")
    meta = {
        "affine": img.affine.copy(),
        "header": img.header.copy(),
        "shape": shape,
        "spacing": tuple(float(z) for z in img.header.get_zooms()[:3]),
    }
    return data, meta


def save_segmentation(seg: np.ndarray, path: str | Path, meta: dict) -> None:
    """Write a label map with the input's affine and qform/sform codes so viewers overlay it exactly."""
    header = meta["header"]
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    out = klass(np.asarray(seg, dtype=np.uint8), meta["affine"])
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    out.header.set_qform(qform if qform is not None else meta["affine"], code=int(qcode))
    out.header.set_sform(sform if sform is not None else meta["affine"], code=int(scode))
    out.header.set_xyzt_units(*header.get_xyzt_units())
    nib.save(out, str(path))
