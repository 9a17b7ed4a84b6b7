"""A PACS round trip over DICOMweb: fetch an MR series (WADO-RS), segment it, store the SEG back (STOW-RS).

Used by ``fedmri pacs`` and ``POST /v1/pacs/segment``. The series is read with the same
checks as an uploaded zip (``shared.dicom.series_to_volume``), segmented with the NIfTI path's
preprocessing (``server.api.inference.segment_volume``) and stored as a DICOM Segmentation
in the source study. Its size is checked from the series metadata before pixel data is
fetched. Nothing from the headers is logged: counts, sizes and timings only.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field

from shared.dicom import build_segmentation, series_to_volume
from shared.errors import InvalidVolumeError

__all__ = [
    "PacsError",
    "SeriesLookupError",
    "PacsResult",
    "dicomweb_client",
    "choose_series",
    "retrieve_series",
    "round_trip",
]

log = logging.getLogger("fedmri.pacs")
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # its INFO lines carry study and series UIDs

# DICOM JSON tags (PS3.18 F.2): keyword -> tag.
_TAG = {
    "SeriesInstanceUID": "0020000E",
    "Modality": "00080060",
    "SeriesDescription": "0008103E",
    "SeriesNumber": "00200011",
    "Rows": "00280010",
    "Columns": "00280011",
    "NumberOfFrames": "00280008",
}
SOURCE = "PACS series"


class PacsError(RuntimeError):
    """The PACS cannot be reached or refuses a request."""


class SeriesLookupError(PacsError):
    """The study is not on the PACS, or has no MR series, or several and none was chosen."""


@dataclass
class PacsResult:
    """What a round trip did: which series it read and the SEG it stored."""

    study_uid: str
    series_uid: str
    seg_series_uid: str
    seg_sop_instance_uid: str
    model_version: str
    instances: int
    shape: tuple[int, int, int]
    labels: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _value(item: dict, keyword: str):
    values = item.get(_TAG[keyword], {}).get("Value") or [None]
    return values[0]


def dicomweb_client(url: str, timeout_s: float = 60.0, headers: dict[str, str] | None = None):
    """A ``DICOMwebClient`` for the DICOMweb root ``url`` (e.g. ``http://pacs:8042/dicom-web``).

    Its requests session (with ``headers``, e.g. Authorization) and timeout are kept as
    ``fedmri_session`` and ``fedmri_timeout_s`` for :func:`retrieve_series`.
    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    if not url.startswith(("http://", "https://")):
        raise ValueError(f"PACS URL must start with http:// or https://, got {url[:40]!r}")
    session = requests.Session()
    session.headers.update(headers or {})
    client = DICOMwebClient(url=url.rstrip("/"), session=session, timeout=timeout_s)
    client.fedmri_session, client.fedmri_timeout_s, client.fedmri_url = session, timeout_s, url.rstrip("/")
    return client


def _call(what: str, fn, *args, **kwargs):
    import requests

    try:
        return fn(*args, **kwargs)
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        raise PacsError(f"PACS refused {what} (HTTP {code})") from None
    except requests.RequestException as exc:
        raise PacsError(f"PACS unreachable during {what} ({type(exc).__name__})") from None


def choose_series(client, study_uid: str, series_uid: str | None = None) -> str:
    """The study's MR series to segment: ``series_uid`` if given (it must be MR), else the only MR series.

    Raises:
        SeriesLookupError: the study has no MR series, or several and none was chosen.
    """
    found = (
        _call(
            "the series search (QIDO-RS)",
            client.search_for_series,
            study_instance_uid=study_uid,
            fields=["SeriesDescription", "SeriesNumber"],
        )
        or []
    )
    mr = [s for s in found if _value(s, "Modality") == "MR"]
    if series_uid is not None:
        if not any(_value(s, "SeriesInstanceUID") == series_uid for s in found):
            raise SeriesLookupError("the study has no series with that SeriesInstanceUID")
        if not any(_value(s, "SeriesInstanceUID") == series_uid for s in mr):
            raise SeriesLookupError("the chosen series is not an MR series")
        return series_uid
    if not found:
        raise SeriesLookupError("study not found on the PACS, or it has no series")
    if not mr:
        raise SeriesLookupError(f"the study has no MR series ({len(found)} other series)")
    if len(mr) > 1:
        listing = "; ".join(f"{_value(s, 'SeriesInstanceUID')} (number {_value(s, 'SeriesNumber')})" for s in mr)
        raise SeriesLookupError(f"the study has {len(mr)} MR series; choose one with its SeriesInstanceUID: {listing}")
    return _value(mr[0], "SeriesInstanceUID")


def _parse_options(content_type: str) -> dict[str, str]:
    out = {}
    for item in content_type.split(";")[1:]:
        key, _, value = item.strip().partition("=")
        out[key.strip().lower()] = value.strip().strip('"')
    return out


def retrieve_series(client, study_uid: str, series_uid: str, max_bytes: int) -> list:
    """WADO-RS retrieval of a series' instances as pydicom datasets, at most ``max_bytes`` in all.

    dicomweb-client's own reader refuses instances stored without the 128-byte preamble (which
    Orthanc returns as they were stored, e.g. after a STOW by pydicom's default writer); this one
    reads them, and stops a response that grows beyond ``max_bytes`` while it streams.
    """
    import pydicom
    import requests

    url = f"{client.fedmri_url}/studies/{study_uid}/series/{series_uid}"
    headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    try:
        with client.fedmri_session.get(url, headers=headers, stream=True, timeout=client.fedmri_timeout_s) as response:
            response.raise_for_status()
            body = bytearray()
            for chunk in response.iter_content(1024 * 1024):
                body += chunk
                if len(body) > max_bytes:
                    raise InvalidVolumeError(f"{SOURCE}: the PACS sends more than {max_bytes} bytes for the series")
            content_type = response.headers.get("Content-Type", "")
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        raise PacsError(f"PACS refused the series retrieval (WADO-RS) (HTTP {code})") from None
    except requests.RequestException as exc:
        raise PacsError(f"PACS unreachable during the series retrieval (WADO-RS) ({type(exc).__name__})") from None
    boundary = _parse_options(content_type).get("boundary")
    if not content_type.startswith("multipart/related") or not boundary:
        raise PacsError("PACS answered the series retrieval (WADO-RS) without a multipart/related body")
    datasets = []
    for part in bytes(body).split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break  # the closing delimiter
        _, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        content = content.removesuffix(b"\r\n")
        try:
            datasets.append(pydicom.dcmread(io.BytesIO(content), force=True))
        except Exception as exc:  # corrupt part
            raise InvalidVolumeError(
                f"{SOURCE}: instance {len(datasets)} is not readable DICOM ({type(exc).__name__})"
            ) from None
    if not datasets:
        raise SeriesLookupError("the PACS returned no instances for the series")
    return datasets


def _check_size(client, study_uid: str, series_uid: str, max_voxels: int) -> int:
    """Instance count and voxel total from the series metadata, before any pixel data is fetched."""
    metadata = _call("the series metadata (WADO-RS)", client.retrieve_series_metadata, study_uid, series_uid)
    voxels = sum(
        int(_value(m, "Rows") or 0) * int(_value(m, "Columns") or 0) * int(_value(m, "NumberOfFrames") or 1)
        for m in metadata
    )
    if voxels > max_voxels:
        raise InvalidVolumeError(
            f"{SOURCE}: {len(metadata)} instances with {voxels} voxels, more than the limit of {max_voxels}"
        )
    return len(metadata)


def round_trip(
    client,
    study_uid: str,
    model,
    series_uid: str | None = None,
    max_voxels: int = 512**3,
    overlap: float = 0.25,
    sw_batch_size: int | None = None,
) -> PacsResult:
    """Fetch one MR series of ``study_uid``, segment it with ``model`` and store the SEG in the same study.

    Args:
        client: a ``DICOMwebClient`` (see :func:`dicomweb_client`).
        study_uid: StudyInstanceUID on the PACS.
        model: a ``server.api.inference.ServedModel``.
        series_uid: the series to segment (default: the study's only MR series).
        max_voxels: largest series accepted, checked from its metadata first.
        overlap, sw_batch_size: sliding-window settings.

    Raises:
        PacsError: PACS unreachable or refusing, no usable series.
        InvalidVolumeError: the series is not one evenly spaced MR volume (as for uploads).
    """
    from server.api.inference import label_volumes, segment_volume
    from shared.dicom import segmentation_to_bytes

    timings: dict[str, float] = {}
    start = time.perf_counter()
    series_uid = choose_series(client, study_uid, series_uid)
    count = _check_size(client, study_uid, series_uid, max_voxels)
    datasets = retrieve_series(client, study_uid, series_uid, max_voxels * 4 + count * 256 * 1024)
    timings["fetch_s"] = time.perf_counter() - start
    start = time.perf_counter()
    image, meta = series_to_volume(datasets, SOURCE, max_voxels)
    timings["read_s"] = time.perf_counter() - start
    seg = segment_volume(model, image, meta, overlap=overlap, sw_batch_size=sw_batch_size)
    timings.update(seg.timings)
    start = time.perf_counter()
    dataset = build_segmentation(seg.labels, meta["dicom"], model.version)
    dataset.preamble = b"\0" * 128  # a Part 10 file as stored, whatever writer the STOW uses
    size = len(segmentation_to_bytes(dataset))
    _call("storing the SEG (STOW-RS)", client.store_instances, [dataset], study_instance_uid=study_uid)
    timings["store_s"] = time.perf_counter() - start
    log.info(
        "PACS round trip: %d instances (%d voxels) segmented with model %s, %d-byte SEG stored in %.2fs",
        count,
        image.size,
        model.version,
        size,
        sum(timings.values()),
    )
    return PacsResult(
        study_uid,
        series_uid,
        str(dataset.SeriesInstanceUID),
        str(dataset.SOPInstanceUID),
        model.version,
        count,
        tuple(int(n) for n in image.shape),
        label_volumes(seg.labels, meta["affine"], model.label_names),
        timings,
    )
