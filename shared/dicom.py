"""DICOM in and out: one MR series (a zip, or datasets from a PACS) to ``(array, meta)``, and DICOM SEG back.

Reading uses pydicom for parsing and pixel decoding; geometry is computed here from the
headers (``ImageOrientationPatient``, ``ImagePositionPatient``, ``PixelSpacing``) and checked
against SimpleITK's series reader in the tests. The volume comes out exactly like
``shared.io.load_volume``'s: a float32 ``(X, Y, Z)`` array in voxel order (column, row, slice)
and a RAS ``affine`` (DICOM's LPS with x and y negated), so the API and the CLI segment it
with the NIfTI path's code. Stored values become ``RescaleSlope * stored + RescaleIntercept``,
per slice as the headers say, in float64 then float32: a linear map, no clipping, no
per-slice normalisation, so a scanner's ``s*x + b`` still cancels in the first instance norm.

Writing builds a DICOM Segmentation with highdicom that references the source instances,
with SNOMED CT coded segments. Only what the SEG IOD requires of the source (patient and
study modules, frame of reference, geometry) is handed to highdicom; every other attribute
of the source headers is dropped first.

Every error is an :class:`~shared.errors.InvalidVolumeError` naming the problem and, at most,
the entry's position in the zip: never a file name, UID or header text (they can identify a
patient).
"""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from shared.errors import InvalidVolumeError
from shared.labels import LABELS

__all__ = [
    "ZIP_MAGICS",
    "MR_IMAGE_STORAGE",
    "SEG_STORAGE",
    "ZipLimits",
    "is_zip",
    "read_zip_datasets",
    "series_to_volume",
    "read_series_zip",
    "build_segmentation",
    "segmentation_to_bytes",
    "segment_codes",
    "make_mr_series",
    "series_to_zip",
    "LPS_TO_RAS",
]

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end record
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Geometry tolerances: positions in mm, directions as cosines.
POSITION_TOL_MM = 1e-3
DIRECTION_TOL = 1e-4
SPACING_REL_TOL = 0.01
_SKIPPED_PREFIXES = ("__MACOSX/",)


@dataclass(frozen=True)
class ZipLimits:
    """What a zipped series may claim before anything is inflated.

    Args:
        max_voxels: largest volume (rows x columns x slices), as for NIfTI uploads.
        max_entries: most files in the zip.
        bytes_per_voxel: pixel bytes allowed per voxel when bounding the inflated size
            (4 covers 32-bit pixel data).
        header_bytes: allowance per file for its DICOM header.
        max_ratio: largest compression ratio of one entry; beyond it the zip is treated as a bomb.
    """

    max_voxels: int = 512**3
    max_entries: int = 4096
    bytes_per_voxel: int = 4
    header_bytes: int = 256 * 1024
    max_ratio: float = 1000.0

    def max_inflated(self, entries: int) -> int:
        return self.max_voxels * self.bytes_per_voxel + entries * self.header_bytes


def is_zip(prefix: bytes) -> bool:
    """Whether the first bytes of an upload are a zip archive's."""
    return prefix[:4] in ZIP_MAGICS


def _entry_bytes(archive: zipfile.ZipFile, info: zipfile.ZipInfo, index: int, source: str) -> bytes:
    """Inflate one entry, never beyond its declared size."""
    out = bytearray()
    try:
        with archive.open(info) as member:
            while chunk := member.read(1024 * 1024):
                out += chunk
                if len(out) > info.file_size:
                    raise InvalidVolumeError(
                        f"{source}: zip entry {index} inflates beyond its declared size (zip bomb?)"
                    )
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
        raise InvalidVolumeError(
            f"{source}: zip entry {index} cannot be read ({type(exc).__name__}: corrupt or unsupported zip)"
        ) from None
    return bytes(out)


def read_zip_datasets(path: str | Path, limits: ZipLimits = ZipLimits(), source: str = "upload") -> list:
    """Parse every file of a zip as DICOM, after checking the zip's declared sizes and entry count.

    Directories and ``__MACOSX/`` entries are skipped. Nothing is written to disk.

    Raises:
        InvalidVolumeError: not a zip, empty, too many entries, declared sizes over the limit,
            a suspicious compression ratio, encrypted entries, or an entry that is not DICOM.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidVolumeError(f"{source}: corrupt zip archive ({type(exc).__name__})") from None
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir() and not i.filename.startswith(_SKIPPED_PREFIXES)]
        if not infos:
            raise InvalidVolumeError(f"{source}: the zip holds no files; expected the DICOM files of one MR series")
        if len(infos) > limits.max_entries:
            raise InvalidVolumeError(
                f"{source}: the zip holds {len(infos)} files, more than the limit of {limits.max_entries}"
            )
        declared = sum(i.file_size for i in infos)
        allowed = limits.max_inflated(len(infos))
        if declared > allowed:
            raise InvalidVolumeError(
                f"{source}: the zip declares {declared} bytes uncompressed, more than the limit of {allowed} "
                f"({limits.max_voxels} voxels)"
            )
        for index, info in enumerate(infos):
            if info.flag_bits & 0x1:
                raise InvalidVolumeError(f"{source}: zip entry {index} is encrypted")
            if info.file_size > limits.max_ratio * max(info.compress_size, 1) and info.file_size > 1024 * 1024:
                raise InvalidVolumeError(
                    f"{source}: zip entry {index} claims a compression ratio above {limits.max_ratio:g} (zip bomb?)"
                )
        datasets = []
        for index, info in enumerate(infos):
            raw = _entry_bytes(archive, info, index, source)
            if info.filename.rsplit("/", 1)[-1].upper() == "DICOMDIR":
                continue  # a media directory, not a series member
            try:
                ds = pydicom.dcmread(io.BytesIO(raw))
            except InvalidDicomError:
                raise InvalidVolumeError(
                    f"{source}: zip entry {index} is not a DICOM file (no DICM preamble)"
                ) from None
            except Exception as exc:  # pydicom raises many types for corrupt data
                raise InvalidVolumeError(
                    f"{source}: zip entry {index} is not a readable DICOM file ({type(exc).__name__})"
                ) from None
            ds.fedmri_entry = index  # position in the zip, for error messages
            datasets.append(ds)
    if not datasets:
        raise InvalidVolumeError(f"{source}: the zip holds no DICOM images")
    return datasets


def _where(ds, k: int) -> str:
    entry = getattr(ds, "fedmri_entry", None)
    return f"zip entry {entry}" if entry is not None else f"instance {k}"


def _floats(ds, keyword: str, n: int, k: int, source: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        out = None
    if out is None or out.shape != (n,) or not np.all(np.isfinite(out)):
        raise InvalidVolumeError(f"{source}: {_where(ds, k)} has no valid {keyword} (needed for the volume's geometry)")
    return out


def _check_decodable(ds, k: int, source: str) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    ts = UID(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None
    if ts is None or not ts.is_compressed:
        return
    try:
        decoder = get_decoder(ts)
        available = decoder.is_available
    except (NotImplementedError, ValueError):
        available = False
    if not available:
        raise InvalidVolumeError(
            f"{source}: {_where(ds, k)} uses the compressed transfer syntax '{ts.name}' ({ts}), "
            "which this server cannot decode; send the series uncompressed (Explicit VR Little Endian)"
        )


@dataclass
class SeriesGeometry:
    """Where the sorted slices lie: the RAS affine of the stacked volume and its shape."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    datasets: list = field(repr=False)


def _series_geometry(datasets: Sequence, source: str, max_voxels: int | None) -> SeriesGeometry:
    """Validate one series' headers and sort its slices; no pixel data is decoded."""
    if not datasets:
        raise InvalidVolumeError(f"{source}: no DICOM instances")
    for k, ds in enumerate(datasets):
        sop_class = str(ds.get("SOPClassUID", ""))
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            from pydicom.uid import UID

            kind = UID(sop_class).name if sop_class else "unknown SOP class"
            raise InvalidVolumeError(
                f"{source}: {_where(ds, k)} is not an image ({kind}, no pixel data); send only the MR images"
            )
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for ds in datasets)
    if len(series) > 1:
        counts = ", ".join(str(n) for n in sorted(series.values(), reverse=True))
        raise InvalidVolumeError(
            f"{source}: {len(series)} series mixed ({counts} instances); send one series per upload"
        )
    for k, ds in enumerate(datasets):
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class == ENHANCED_MR_IMAGE_STORAGE or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InvalidVolumeError(
                f"{source}: {_where(ds, k)} is a multi-frame image; send a classic single-frame MR series"
            )
        if str(ds.get("Modality", "")) != "MR":
            raise InvalidVolumeError(f"{source}: {_where(ds, k)} has modality '{ds.get('Modality', '')}'; expected MR")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise InvalidVolumeError(f"{source}: {_where(ds, k)} is a colour image; expected greyscale MR")
        _check_decodable(ds, k, source)
    uids = Counter(str(ds.get("SOPInstanceUID", "")) for ds in datasets)
    if max(uids.values()) > 1:
        raise InvalidVolumeError(f"{source}: duplicate slices: {max(uids.values())} copies of the same instance")

    first = datasets[0]
    rows, cols = int(first.get("Rows", 0)), int(first.get("Columns", 0))
    orientation = _floats(first, "ImageOrientationPatient", 6, 0, source)
    pixel = _floats(first, "PixelSpacing", 2, 0, source)
    for k, ds in enumerate(datasets):
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (rows, cols):
            raise InvalidVolumeError(
                f"{source}: slices differ in size ({rows}x{cols} and {ds.get('Rows')}x{ds.get('Columns')})"
            )
        if np.abs(_floats(ds, "ImageOrientationPatient", 6, k, source) - orientation).max() > DIRECTION_TOL:
            raise InvalidVolumeError(f"{source}: slices differ in orientation (ImageOrientationPatient); not one stack")
        if np.abs(_floats(ds, "PixelSpacing", 2, k, source) - pixel).max() > POSITION_TOL_MM:
            raise InvalidVolumeError(f"{source}: slices differ in pixel spacing")
    if rows < 1 or cols < 1:
        raise InvalidVolumeError(f"{source}: image size {rows}x{cols} has no pixels")
    if min(pixel) <= 0:
        raise InvalidVolumeError(f"{source}: PixelSpacing must be positive")
    row_dir, col_dir = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(row_dir @ col_dir) > 1e-3
    ):
        raise InvalidVolumeError(f"{source}: ImageOrientationPatient is not two orthogonal unit vectors")
    n = len(datasets)
    if n < 2:
        raise InvalidVolumeError(f"{source}: a series of 1 slice is 2-D; expected a 3-D series (at least 2 slices)")
    voxels = rows * cols * n
    if max_voxels is not None and voxels > max_voxels:
        raise InvalidVolumeError(f"{source}: the series has {voxels} voxels, more than the limit of {max_voxels}")

    normal = np.cross(row_dir, col_dir)
    positions = np.stack([_floats(ds, "ImagePositionPatient", 3, k, source) for k, ds in enumerate(datasets)])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    datasets = [datasets[i] for i in order]
    along = positions @ normal
    gaps = np.diff(along)
    if gaps.min() < POSITION_TOL_MM:
        dup = int((gaps < POSITION_TOL_MM).sum())
        raise InvalidVolumeError(f"{source}: duplicate slices: {dup + 1 if dup == 1 else dup} slices share a position")
    step_mm = float(gaps.min())
    if gaps.max() - step_mm > max(SPACING_REL_TOL * step_mm, POSITION_TOL_MM):
        multiples = gaps / step_mm
        if np.all(np.abs(multiples - np.rint(multiples)) < SPACING_REL_TOL * 5):
            missing = int(np.rint(multiples).sum() - len(gaps))
            where = int(np.argmax(multiples > 1.5))
            raise InvalidVolumeError(
                f"{source}: missing slices: {missing} slice(s) absent from the series (first gap after slice {where} "
                f"of {n}, spacing {step_mm:.3g} mm)"
            )
        raise InvalidVolumeError(
            f"{source}: non-uniform slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm); "
            "expected evenly spaced slices"
        )
    # The slice step as a vector: includes any in-plane drift of a tilted (sheared) acquisition.
    step = (positions[-1] - positions[0]) / (n - 1)
    drift = positions - (positions[0] + np.arange(n)[:, None] * step)
    if np.abs(drift).max() > max(0.01 * np.linalg.norm(step), POSITION_TOL_MM):
        raise InvalidVolumeError(f"{source}: slice positions do not lie on one line; not a single stack")
    lps = np.eye(4)
    lps[:3, 0] = row_dir * pixel[1]  # voxel axis 0: along a row (column index), PixelSpacing[1] apart
    lps[:3, 1] = col_dir * pixel[0]  # voxel axis 1: down a column (row index), PixelSpacing[0] apart
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps
    spacing = (float(pixel[1]), float(pixel[0]), float(np.linalg.norm(step)))
    return SeriesGeometry(affine, (cols, rows, n), spacing, datasets)


def _pixels(ds, k: int, shape: tuple[int, int], source: str) -> np.ndarray:
    """One slice's values: ``RescaleSlope * stored + RescaleIntercept`` (float64), shape (rows, cols)."""
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoder failures, truncated pixel data
        raise InvalidVolumeError(
            f"{source}: {_where(ds, k)}: pixel data could not be decoded ({type(exc).__name__})"
        ) from None
    if stored.shape != shape:
        raise InvalidVolumeError(f"{source}: {_where(ds, k)}: pixel data has shape {stored.shape}, header says {shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise InvalidVolumeError(f"{source}: {_where(ds, k)}: invalid RescaleSlope/RescaleIntercept")
    return stored.astype(np.float64) * slope + intercept


def _nifti_header(affine: np.ndarray, shape: tuple[int, int, int]) -> nib.Nifti1Header:
    """A NIfTI-1 header for the DICOM volume: sform (and qform, when the affine has no shear) coded 'scanner'."""
    img = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), None)
    header = img.header
    header.set_data_shape(shape)
    header.set_sform(affine, code=1)
    rzs = affine[:3, :3]
    gram = rzs.T @ rzs
    if np.abs(gram - np.diag(np.diag(gram))).max() <= 1e-6 * np.abs(gram).max():
        header.set_qform(affine, code=1)
    else:
        header.set_qform(None, code=0)
    header.set_xyzt_units("mm")
    return header


def series_to_volume(
    datasets: Sequence,
    source: str = "upload",
    max_voxels: int | None = None,
    dtype: type = np.float32,
    check_grid: Callable | None = None,
) -> tuple[np.ndarray, dict]:
    """Stack one MR series into ``(array, meta)`` as ``shared.io.load_volume`` returns it.

    Args:
        datasets: the series' instances (pydicom datasets, any order).
        source: how error messages name the input.
        max_voxels: largest accepted volume, checked before any pixel is decoded.
        dtype: array type.
        check_grid: ``check_grid(shape, affine)``, called before any pixel is decoded (the API's
            work budget); it raises to refuse the grid.

    Returns:
        ``array`` of shape ``(columns, rows, slices)`` and ``meta`` with ``affine`` (RAS),
        ``header`` (a NIfTI-1 header of that affine), ``shape``, ``spacing``, ``full_shape``,
        ``nifti_version`` (1) and ``dicom``: the sorted source datasets, for building a SEG.

    Raises:
        InvalidVolumeError: several series, non-images, missing or duplicate slices, uneven
            spacing, undecodable compression, inconsistent geometry, too many voxels, NaN/Inf.
    """
    geometry = _series_geometry(list(datasets), source, max_voxels)
    if check_grid is not None:
        check_grid(geometry.shape, geometry.affine)
    cols, rows, n = geometry.shape
    volume = np.empty(geometry.shape, dtype=dtype)
    for k, ds in enumerate(geometry.datasets):
        volume[:, :, k] = _pixels(ds, k, (rows, cols), source).T
    if not np.all(np.isfinite(volume)):
        raise InvalidVolumeError(f"{source}: contains NaN or Inf voxels")
    for ds in geometry.datasets:  # the voxels are in ``volume`` now; keep only headers
        for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:
                del ds[keyword]
    meta = {
        "affine": geometry.affine,
        "header": _nifti_header(geometry.affine, geometry.shape),
        "shape": geometry.shape,
        "spacing": geometry.spacing,
        "full_shape": geometry.shape,
        "nifti_version": 1,
        "dicom": geometry.datasets,
        "warnings": [],
    }
    return volume, meta


def read_series_zip(
    path: str | Path, source: str = "upload", limits: ZipLimits = ZipLimits(), check_grid: Callable | None = None
) -> tuple[np.ndarray, dict]:
    """A zip of one MR series' DICOM files -> ``(array, meta)`` (see :func:`series_to_volume`)."""
    return series_to_volume(read_zip_datasets(path, limits, source), source, limits.max_voxels, check_grid=check_grid)


# --- DICOM SEG -------------------------------------------------------------------------------

# SNOMED CT codes per label (DICOM CID 7150 categories, CID 7151/7153 property types).
_SEGMENT_CODES: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "grey matter": (("91723000", "Anatomical Structure"), ("389081007", "Gray matter")),
    "white matter": (("91723000", "Anatomical Structure"), ("389080008", "White matter")),
    "lesion": (("49755003", "Morphologically Abnormal Structure"), ("52988006", "Lesion")),
}
_BRAIN = ("12738006", "Brain")

# What the SEG IOD needs from a source image (patient, study, frame of reference, geometry).
# Everything else in the source header, identifiers included, never reaches the SEG.
_SOURCE_KEEP = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "Modality",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


def segment_codes(label: int):
    """``(category, property type)`` as pydicom ``Code``s (SNOMED CT) for a label of ``shared.labels``."""
    from pydicom.sr.coding import Code

    name = LABELS.get(label)
    if name not in _SEGMENT_CODES:
        raise ValueError(f"no SNOMED CT code for label {label} ({name!r})")
    (cat, cat_meaning), (prop, prop_meaning) = _SEGMENT_CODES[name]
    return Code(cat, "SCT", cat_meaning), Code(prop, "SCT", prop_meaning)


def _minimal_source(ds):
    from pydicom.dataset import Dataset

    out = Dataset()
    for keyword in _SOURCE_KEEP:
        if keyword in ds:
            setattr(out, keyword, ds.data_element(keyword).value)
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        if keyword not in out:
            setattr(out, keyword, None)  # type 2 in the SEG: present, may be empty
    return out


def build_segmentation(
    labels: np.ndarray,
    datasets: Sequence,
    model_version: str,
    labels_present: Iterable[int] | None = None,
    series_number: int = 9001,
):
    """A highdicom ``Segmentation`` (BINARY, one segment per foreground label) of a series.

    Args:
        labels: ``(columns, rows, slices)`` label map on the series' grid (``meta["dicom"]`` order).
        datasets: the sorted source datasets (``meta["dicom"]`` from :func:`series_to_volume`).
        model_version: the model that made the labels (goes into SoftwareVersions).
        labels_present: segment labels to describe (default: every foreground label of ``shared.labels``).
        series_number: the SEG's SeriesNumber.
    """
    import highdicom as hd

    cols, rows, n = labels.shape
    if n != len(datasets):
        raise ValueError(f"labels have {n} slices but the series has {len(datasets)} instances")
    sources = [_minimal_source(ds) for ds in datasets]
    wanted = sorted(k for k in (labels_present if labels_present is not None else LABELS) if k != 0)
    descriptions, remap = [], np.zeros(max(LABELS) + 1, dtype=np.uint8)
    for number, label in enumerate(wanted, start=1):
        category, prop = segment_codes(label)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=LABELS[label],
                segmented_property_category=category,
                segmented_property_type=prop,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name="fedmri",
                    version=model_version[:64],
                    family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence"),
                ),
                anatomic_regions=[hd.sr.CodedConcept(_BRAIN[0], "SCT", _BRAIN[1])],
            )
        )
        remap[label] = number
    frames = remap[np.clip(np.transpose(labels, (2, 1, 0)), 0, len(remap) - 1)]  # (slices, rows, columns)
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fedmri",
        manufacturer_model_name="fedmri instance-norm UNet",
        software_versions=model_version[:64],
        device_serial_number="none",
        series_description="fedmri segmentation",
        content_label="FEDMRI",
        content_description="grey matter, white matter, lesion",
        omit_empty_frames=False,
    )


def segmentation_to_bytes(seg) -> bytes:
    """A SEG (or any pydicom dataset) as Part 10 file bytes."""
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- writing a series (tests, demos, PACS uploads) --------------------------------------------


def make_mr_series(
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    per_slice_rescale: bool = False,
    bits: int = 16,
    patient_name: str = "Synthetic^Subject",
    patient_id: str = "FEDMRI-SYNTH",
    study_uid: str | None = None,
    series_description: str = "synthetic T1",
    extra: dict | None = None,
) -> list:
    """An MR Image Storage series (one pydicom dataset per slice) holding ``volume`` on ``affine``.

    Values are stored as unsigned integers with ``RescaleSlope``/``RescaleIntercept`` chosen so
    that ``slope * stored + intercept`` reproduces ``volume`` to within half a quantisation step
    (per slice when ``per_slice_rescale``). Voxel axis 0 runs along a row, 1 down a column, 2
    across slices, as :func:`series_to_volume` reads them back.

    Args:
        volume: ``(X, Y, Z)`` intensities.
        affine: RAS voxel-to-world affine (NIfTI convention); must not mix slice and in-plane axes.
        per_slice_rescale: a separate slope/intercept per slice (as some scanners write).
        bits: 8 or 16 bits stored.
        patient_name, patient_id, study_uid, series_description: header values.
        extra: further attributes set on every slice (keyword -> value).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    volume = np.asarray(volume, dtype=np.float64)
    lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(affine, dtype=np.float64)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    row_dir, col_dir = col_step / np.linalg.norm(col_step), row_step / np.linalg.norm(row_step)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    levels = 2**bits - 1
    dtype = np.uint16 if bits == 16 else np.uint8
    datasets = []
    lo_all, hi_all = float(volume.min()), float(volume.max())
    for k in range(volume.shape[2]):
        plane = volume[:, :, k].T  # (rows, columns)
        lo, hi = (float(plane.min()), float(plane.max())) if per_slice_rescale else (lo_all, hi_all)
        slope = (hi - lo) / levels if hi > lo else 1.0
        stored = np.rint((plane - lo) / slope).clip(0, levels).astype(dtype)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta, ds.preamble = meta, b"\0" * 128
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = (
            "20260101",
            "120000",
            "1",
            "",
            "",
        )
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, k + 1
        ds.SeriesDescription = series_description
        ds.Manufacturer = "fedmri synthetic"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "NONE", "", "3D"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, 3] + k * slice_step]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{np.linalg.norm(row_step):.6f}", f"{np.linalg.norm(col_step):.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(slice_step):.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit, ds.PixelRepresentation = bits - 1, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:.10g}", f"{lo:.10g}", "US"
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        ds.PixelData = stored.tobytes()
        datasets.append(ds)
    return datasets


def series_to_zip(datasets: Iterable, path: str | Path | None = None) -> bytes:
    """Write datasets as Part 10 files into a zip (returned as bytes, and written to ``path`` if given)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for k, ds in enumerate(datasets):
            archive.writestr(f"series/IM{k:05d}.dcm", segmentation_to_bytes(ds))
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data
