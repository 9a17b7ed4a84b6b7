"""Every field of an uploaded NIfTI-1/2 header, checked from its first bytes before any voxel is read.

``check_header`` validates what nibabel and the pipeline use: magic and header size, dims,
datatype and bitpix, ``vox_offset``, ``scl_slope``/``scl_inter``, ``xyzt_units``, pixdim and
qfac, the qform (codes, quaternion norm, offsets) and the sform (codes, finite, invertible,
decomposable). A field nibabel would recover from is recovered the same way and named in
``CheckedHeader.warnings``: an unknown xform code or units code is set to 0, negative pixdim
to its absolute value, a qfac other than +-1 to 1, a non-finite ``scl_slope`` means unscaled
data. Beyond nibabel, a broken qform falls back to a valid sform and a broken sform to a valid
qform; the broken one is rewritten from the affine in use, so the label map keeps the input's
codes on a valid grid. Anything else is an :class:`InvalidVolumeError` naming the field.

Messages carry field names and numbers only, never header text (``descrip``, ``aux_file``,
extensions may hold patient data).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from shared.errors import InvalidVolumeError

__all__ = ["HEADER_BYTES", "CheckedHeader", "nifti_class", "check_header"]

# NIfTI-1 headers are 348 bytes and NIfTI-2 540; 544 covers either plus the 4 extension bytes.
HEADER_BYTES = 544
# Sanity bounds on the affine: a voxel axis longer than 1 km or an origin farther than 100 km
# is no MRI and would only feed overflow and round-off into the grid computations.
MAX_AXIS_MM = 1e6
MAX_OFFSET_MM = 1e8
MIN_DET = 1e-9  # shared.io's invertibility threshold (mm^3 per voxel)
MAX_CONDITION = 1e6  # singular value ratio of the 3x3 part beyond which it is not a usable grid

_XFORM_CODES = frozenset(int(c) for c in nib.nifti1.xform_codes.value_set())
_UNIT_CODES = frozenset(int(c) for c in nib.nifti1.unit_codes.value_set())


@dataclass
class CheckedHeader:
    """A validated header: the repaired header to read the volume with, and what was repaired.

    Attributes:
        header: copy of the upload's header with recovered fields written back.
        shape: the header's data shape (e.g. ``(X, Y, Z)`` or ``(X, Y, Z, 1)``).
        affine: voxel-to-world matrix the volume is read with (nibabel's best affine of ``header``).
        data_bytes: bytes of header, gap and voxel data the header describes.
        warnings: one sentence per recovered field.
    """

    header: nib.Nifti1Header
    shape: tuple[int, ...]
    affine: np.ndarray
    data_bytes: int
    warnings: list[str] = field(default_factory=list)

    @property
    def shape3(self) -> tuple[int, int, int]:
        return tuple(self.shape[:3])  # type: ignore[return-value]

    @property
    def nifti_version(self) -> int:
        return 2 if isinstance(self.header, nib.Nifti2Header) else 1


def nifti_class(prefix: bytes) -> type[nib.Nifti1Header] | None:
    """The header class whose ``sizeof_hdr`` the first 4 bytes hold (either byte order), else None."""
    sizes = {int.from_bytes(prefix[:4], "little"), int.from_bytes(prefix[:4], "big")} if len(prefix) >= 4 else set()
    if 348 in sizes:
        return nib.Nifti1Header
    if 540 in sizes:
        return nib.Nifti2Header
    return None


def _parse(prefix: bytes, source: str) -> nib.Nifti1Header:
    if len(prefix) < 4:
        raise InvalidVolumeError(f"{source}: not a NIfTI file ({len(prefix)} bytes; expected .nii or .nii.gz)")
    klass = nifti_class(prefix)
    if klass is None:
        raise InvalidVolumeError(f"{source}: not a NIfTI file (no NIfTI-1 or NIfTI-2 header; expected .nii or .nii.gz)")
    if klass is nib.Nifti1Header:
        magic, pair, magic_at, expected = b"n+1\0", b"ni1\0", 344, "n+1"
    else:
        magic, pair, magic_at, expected = b"n+2\0\r\n\x1a\n", b"ni2\0\r\n\x1a\n", 4, "n+2"
    if len(prefix) < klass.sizeof_hdr:
        raise InvalidVolumeError(f"{source}: file ends inside the NIfTI header ({len(prefix)} bytes; truncated?)")
    found = prefix[magic_at : magic_at + len(magic)]
    if found == pair:
        raise InvalidVolumeError(
            f"{source}: two-file NIfTI (.hdr/.img) is not supported; send a single .nii or .nii.gz")
    if found != magic:
        raise InvalidVolumeError(f"{source}: wrong NIfTI magic (expected '{expected}'); the file is not a valid NIfTI")
    # Byte order from sizeof_hdr (nibabel guesses it from dim[0], which is one of the fields checked here).
    endian = "<" if int.from_bytes(prefix[:4], "little") == klass.sizeof_hdr else ">"
    try:
        return klass.from_fileobj(io.BytesIO(prefix[: klass.sizeof_hdr]), endianness=endian, check=False)
    except Exception as exc:  # nibabel's HeaderDataError and friends
        raise InvalidVolumeError(f"{source}: invalid NIfTI header ({type(exc).__name__})") from None


def _check_dims(hdr: nib.Nifti1Header, source: str, max_voxels: int) -> tuple[int, ...]:
    ndim = int(hdr["dim"][0])
    if not 1 <= ndim <= 7:
        raise InvalidVolumeError(
            f"{source}: invalid NIfTI header: dim[0] (number of dimensions) is {ndim}, expected 1 to 7")
    shape = tuple(int(n) for n in hdr["dim"][1 : ndim + 1])
    if any(n < 0 for n in shape):
        raise InvalidVolumeError(f"{source}: invalid NIfTI header: negative dimension in shape {shape}")
    voxels = math.prod(shape)  # Python ints: NIfTI-2 dims are int64 and their product must not wrap
    if voxels > max_voxels:
        raise InvalidVolumeError(f"{source}: header claims {voxels} voxels, more than the limit of {max_voxels}")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise InvalidVolumeError(f"{source}: expected a 3-D volume (or 4-D with one volume), got shape {shape}")
    if min(shape) < 1:
        raise InvalidVolumeError(f"{source}: zero-length dimension in shape {shape}")
    return shape


def _check_datatype(hdr: nib.Nifti1Header, source: str, warnings: list[str]) -> np.dtype:
    code = int(hdr["datatype"])
    try:
        dtype = hdr.get_data_dtype()
    except Exception:
        raise InvalidVolumeError(f"{source}: invalid NIfTI header: unknown data type code {code} (datatype)") from None
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise InvalidVolumeError(
            f"{source}: unsupported voxel type {dtype.kind!r} (complex or RGB); expected real-valued intensities")
    bits = dtype.itemsize * 8
    if int(hdr["bitpix"]) != bits:  # nibabel reads by datatype and fixes bitpix
        warnings.append(f"bitpix {int(hdr['bitpix'])} does not match the datatype; using the datatype's {bits}")
        hdr["bitpix"] = bits
    return dtype


def _check_offset(hdr: nib.Nifti1Header, source: str) -> int:
    offset = float(hdr["vox_offset"])
    minimum = hdr.single_vox_offset
    if not math.isfinite(offset):
        raise InvalidVolumeError(f"{source}: invalid NIfTI header: vox_offset is not a finite number")
    if offset < minimum:
        raise InvalidVolumeError(
            f"{source}: invalid NIfTI header: vox_offset {offset:g} is inside the header "
            f"(at least {minimum} for a single-file NIfTI)"
        )
    return int(offset)


def _check_scaling(hdr: nib.Nifti1Header, source: str, warnings: list[str]) -> None:
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if slope == 0 or math.isnan(slope):  # the standard's "no scaling"; NaN is nibabel's "not set"
        return
    if not math.isfinite(slope):  # nibabel: no valid scaling, data read as stored
        warnings.append("scl_slope is infinite; voxel values read unscaled as nibabel does")
        hdr["scl_slope"], hdr["scl_inter"] = 0, 0
        return
    if not math.isfinite(inter):
        raise InvalidVolumeError(f"{source}: invalid NIfTI header: scl_inter is not finite (with scl_slope {slope:g})")


def _check_units(hdr: nib.Nifti1Header, warnings: list[str]) -> None:
    code = int(hdr["xyzt_units"])
    if code % 8 not in _UNIT_CODES or code - code % 8 not in _UNIT_CODES:
        warnings.append(f"xyzt_units code {code} unknown; set to 0 (unknown units)")
        hdr["xyzt_units"] = 0


def _affine_problem(affine: np.ndarray) -> str | None:
    """Why ``affine`` is no usable voxel grid (finite, invertible, decomposable), else None."""
    if not np.all(np.isfinite(affine)):
        return "has non-finite entries"
    linear = affine[:3, :3]
    if np.abs(linear).max() > MAX_AXIS_MM or np.abs(affine[:3, 3]).max() > MAX_OFFSET_MM:
        return f"is out of range (voxel axes up to {MAX_AXIS_MM:g} mm, origin within {MAX_OFFSET_MM:g} mm)"
    det = abs(float(np.linalg.det(linear)))
    if det < MIN_DET:
        return f"is not invertible (determinant {det:.3g})"
    singular = np.linalg.svd(linear, compute_uv=False)
    if singular.max() > MAX_CONDITION * singular.min():
        return f"is not decomposable into rotation and zooms (condition number {singular.max() / singular.min():.3g})"
    return None


def _fix_pixdim(hdr: nib.Nifti1Header, warnings: list[str], what: str) -> str | None:
    """pixdim[1..3] and qfac as nibabel fixes them; the problem when they stay unusable."""
    zooms = np.asarray(hdr["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms == 0):
        return "pixdim[1..3] must be finite and non-zero"
    if np.any(zooms < 0):
        warnings.append(f"negative pixdim[1..3] ({what}); using their absolute values as nibabel does")
        hdr["pixdim"][1:4] = np.abs(zooms)
    if float(hdr["pixdim"][0]) not in (-1.0, 1.0):
        qfac = float(hdr["pixdim"][0])
        warnings.append(f"qfac pixdim[0] is {qfac:g}, not 1 or -1 ({what}); set to 1 as nibabel does")
        hdr["pixdim"][0] = 1
    return None


def _qform(hdr: nib.Nifti1Header, warnings: list[str]) -> tuple[np.ndarray | None, str | None]:
    """The qform affine (on a copy of ``hdr`` with nibabel's fixes), or the problem with it."""
    bcd = np.asarray([hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"]], dtype=np.float64)
    if not np.all(np.isfinite(bcd)):
        return None, "quaternion quatern_b/c/d is not finite"
    norm = float(bcd @ bcd)
    try:  # nibabel's own test (extended precision, its tolerance), so nothing it refuses gets through
        hdr.get_qform_quaternion()
    except ValueError:
        return None, f"quaternion norm quatern_b^2+c^2+d^2 = {norm:.6g} exceeds 1"
    offsets = np.asarray([hdr["qoffset_x"], hdr["qoffset_y"], hdr["qoffset_z"]], dtype=np.float64)
    if not np.all(np.isfinite(offsets)):
        return None, "qoffset_x/y/z is not finite"
    fixes: list[str] = []
    problem = _fix_pixdim(hdr, fixes, "qform")
    if problem:
        return None, problem
    affine = hdr.get_qform()
    problem = _affine_problem(affine)
    if problem:
        return None, f"qform affine {problem}"
    warnings.extend(fixes)
    return affine, None


def _sform(hdr: nib.Nifti1Header) -> tuple[np.ndarray | None, str | None]:
    affine = np.eye(4)
    affine[:3] = np.stack([hdr["srow_x"], hdr["srow_y"], hdr["srow_z"]]).astype(np.float64)
    problem = _affine_problem(affine)
    return (None, f"sform (srow_x/y/z) {problem}") if problem else (affine, None)


def _code(hdr: nib.Nifti1Header, name: str, warnings: list[str]) -> int:
    code = int(hdr[name])
    if code not in _XFORM_CODES:  # nibabel's check_fix: "not valid; setting to 0"
        warnings.append(f"{name} {code} is not a NIfTI code; set to 0 (unused) as nibabel does")
        hdr[name] = 0
        return 0
    return code


def _check_geometry(hdr: nib.Nifti1Header, shape: tuple[int, ...], source: str, warnings: list[str]) -> np.ndarray:
    """The affine nibabel would read with (sform, else qform, else pixdim), recovering broken forms."""
    qcode, scode = _code(hdr, "qform_code", warnings), _code(hdr, "sform_code", warnings)
    if qcode == 0 and scode == 0:  # nibabel's base affine from pixdim
        problem = _fix_pixdim(hdr, warnings, "no qform or sform")
        if problem is None:
            affine = hdr.get_base_affine()
            problem = _affine_problem(affine)
            problem = f"the affine from pixdim {problem}" if problem else None
        if problem:
            raise InvalidVolumeError(f"{source}: invalid NIfTI header: {problem} (no qform or sform)")
        return affine
    q_hdr = hdr.copy()
    q_warnings: list[str] = []
    qform, q_problem = _qform(q_hdr, q_warnings) if qcode else (None, None)
    sform, s_problem = _sform(hdr) if scode else (None, None)
    if qform is not None:  # nibabel's fixes of pixdim and qfac, whichever form is used
        warnings.extend(q_warnings)
        hdr["pixdim"][:4] = q_hdr["pixdim"][:4]
    if scode and sform is not None:
        if qcode and qform is None:
            warnings.append(f"qform ignored: {q_problem}; qform rewritten from the sform")
            _set_qform(hdr, sform, qcode)
        _pixdim_from(hdr, sform, warnings)
        return sform
    if qcode and qform is not None:
        if scode:
            warnings.append(f"sform ignored: {s_problem}; sform rewritten from the qform")
            hdr.set_sform(qform, code=scode)
        return qform
    problems = [p for p in (q_problem, s_problem) if p]
    raise InvalidVolumeError(
        f"{source}: invalid NIfTI header: {' and '.join(problems)}; no valid qform or sform to use")


def _set_qform(hdr: nib.Nifti1Header, affine: np.ndarray, code: int) -> None:
    """``set_qform`` whose quaternion nibabel can read back.

    For a 180-degree rotation nibabel may store b, c, d with b^2+c^2+d^2 a few ulp above 1, beyond
    its own reading tolerance (NIfTI-2's float64 fields); shrink them by 1e-12 then.
    """
    hdr.set_qform(affine, code=code)
    try:
        hdr.get_qform_quaternion()
    except ValueError:
        bcd = np.asarray([hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"]], dtype=np.float64)
        bcd *= (1 - 1e-12) / np.sqrt(bcd @ bcd)
        hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"] = bcd


def _pixdim_from(hdr: nib.Nifti1Header, affine: np.ndarray, warnings: list[str]) -> None:
    """Keep pixdim[1..3] (the voxel size nibabel reports) consistent with the sform in use."""
    zooms = np.asarray(hdr["pixdim"][1:4], dtype=np.float64)
    if np.all(np.isfinite(zooms)) and np.all(zooms > 0):
        return
    warnings.append("pixdim[1..3] not finite and positive; voxel size taken from the sform")
    hdr["pixdim"][1:4] = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def check_header(prefix: bytes, source: str, max_voxels: int) -> CheckedHeader:
    """Validate a NIfTI-1/2 header from the first bytes of the (inflated) file.

    Args:
        prefix: at least the header's bytes (``HEADER_BYTES`` cover NIfTI-1 and -2).
        source: how messages name the volume (``"upload"``).
        max_voxels: largest accepted voxel count of the header's shape.

    Returns:
        The repaired header, shape, affine, claimed size and the warnings of what was repaired.

    Raises:
        InvalidVolumeError: naming the field that cannot be used.
    """
    hdr = _parse(prefix, source)
    warnings: list[str] = []
    shape = _check_dims(hdr, source, max_voxels)
    dtype = _check_datatype(hdr, source, warnings)
    offset = _check_offset(hdr, source)
    _check_scaling(hdr, source, warnings)
    _check_units(hdr, warnings)
    affine = _check_geometry(hdr, shape, source, warnings)
    data_bytes = max(offset, hdr.sizeof_hdr) + math.prod(shape) * dtype.itemsize
    return CheckedHeader(hdr, shape, np.asarray(affine, dtype=np.float64), data_bytes, warnings)
