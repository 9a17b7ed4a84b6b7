"""Receiving an uploaded volume: stream it to disk under a size limit, then open it safely.

Everything here is about bytes a stranger sent. The multipart body is parsed as it streams
(``python-multipart``), so the size limit holds before the upload is complete and nothing is
spooled elsewhere. A ``.gz`` is inflated by a thread while it arrives (the upload's transfer
and its inflation overlap instead of adding up); the NIfTI header is checked from its first
inflated bytes, before the rest is inflated or any voxel array is allocated. Error messages
say ``upload``, never the client's file name or header text.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
import numpy as np
from fastapi import HTTPException, Request, status
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from server.api.dicom_upload import open_dicom_upload
from server.api.header import HEADER_BYTES, CheckedHeader, check_header, nifti_class
from shared.dicom import is_zip
from shared.errors import InvalidVolumeError
from shared.io import load_volume

__all__ = ["UPLOAD_FIELD", "SOURCE", "GridCheck", "Received", "receive_upload", "inspect_upload", "open_upload",
           "header_check"]

UPLOAD_FIELD = "file"
SOURCE = "upload"  # how error messages name the volume
# Multipart boundaries and part headers around the file; a Content-Length beyond the limit
# plus this is refused before reading a byte.
MULTIPART_OVERHEAD = 64 * 1024
CHUNK = 1024 * 1024
HEADER_PREFIX = HEADER_BYTES  # NIfTI-1 or -2 header plus the 4 extension bytes
GZIP_MAGIC = b"\x1f\x8b"
# Inflating: ISA-L's zlib-compatible decompressor where installed (``isal``, ~2x zlib's speed on a
# 1 mm brain), else the standard library's; the same stream semantics and gzip format either way.
try:
    from isal import isal_zlib as _inflater

    _GZIP_ERRORS: tuple[type[Exception], ...] = (zlib.error, _inflater.error)
except ImportError:  # optional dependency
    _inflater = zlib
    _GZIP_ERRORS = (zlib.error,)
# ``check_grid(shape, affine)``: the caller's check of the grid a header describes (the work budget).
GridCheck = Callable[[tuple[int, ...], np.ndarray], object]
INFLATED_NAME = "volume.nii"


@dataclass
class Received:
    """What ``receive_upload`` stored: the upload's size and, for a ``.gz``, its inflated volume.

    ``inflated`` is the checked header of ``<dest folder>/volume.nii`` (the raw upload is then
    deleted), or None when the upload was not gzip or nothing was asked to inflate it.
    """

    size: int
    raw: Path
    inflated: CheckedHeader | None = None


class _Follower:
    """Reads the upload file while the receiving task is still writing it: the inflater thread's input.

    ``read`` blocks until more bytes are written or the writer is done; it returns b"" at the end.
    """

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb")
        self._cond = threading.Condition()
        self._written = self._read = 0
        self._done = False

    def grow_to(self, written: int) -> None:
        with self._cond:
            self._written = written
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def read(self, n: int) -> bytes:
        with self._cond:
            while self._read >= self._written and not self._done:
                self._cond.wait()
            n = min(n, self._written - self._read)
        data = self._file.read(n) if n > 0 else b""
        self._read += len(data)
        return data

    def close(self) -> None:
        self._file.close()


class _Inflation:
    """``_gunzip`` of a growing upload in a thread; ``wait()`` returns its checked header or raises its error."""

    def __init__(self, raw: Path, validate: Callable[[bytes], CheckedHeader]) -> None:
        self.follower = _Follower(raw)
        self.dest = raw.with_name(INFLATED_NAME)
        self.checked: CheckedHeader | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(validate,), name="fedmri-inflate", daemon=True)
        self._thread.start()

    def _run(self, validate) -> None:
        try:
            with self.dest.open("wb") as fout:
                self.checked = _gunzip_stream(self.follower, fout, validate)
        except BaseException as exc:  # handed to the request by wait()
            self.error = exc
        finally:
            self.follower.close()

    async def wait(self) -> CheckedHeader:
        await self.wait_quietly()
        if self.error is not None:
            raise self.error
        return self.checked

    async def wait_quietly(self) -> None:
        self.follower.finish()
        await anyio.to_thread.run_sync(self._thread.join)


class _FilePart:
    """python-multipart callbacks that copy the ``file`` field into ``out``, count bytes and keep its first two."""

    def __init__(self, out, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.size, self.too_large, self.found, self.duplicate = 0, False, False, False
        self.magic = b""
        self.other_fields: list[str] = []
        self._writing = False
        self._field, self._value, self._disposition = b"", b"", b""

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._add("_field", data[start:end]),
            "on_header_value": lambda data, start, end: self._add("_value", data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._disposition, self._field, self._value = b"", b"", b""

    def _header_end(self) -> None:
        if self._field.strip().lower() == b"content-disposition":
            self._disposition = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("latin-1")
        if name == UPLOAD_FIELD:
            self.duplicate = self.found
            self.found, self._writing = True, not self.found
        else:
            self.other_fields.append(name[:40])

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._writing or self.too_large:
            return
        self.size += end - start
        if self.size > self.max_bytes:
            self.too_large = True
            return
        if len(self.magic) < len(GZIP_MAGIC):
            self.magic += data[start:end][: len(GZIP_MAGIC) - len(self.magic)]
        self.out.write(data[start:end])

    def _part_end(self) -> None:
        self._writing = False


def _too_large(max_bytes: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE, f"upload exceeds the limit of {max_bytes} bytes"
    )


async def receive_upload(request: Request, dest: Path, max_bytes: int,
                         validate: Callable[[bytes], CheckedHeader] | None = None) -> Received:
    """Stream the multipart field ``file`` of ``request`` into ``dest``; a ``.gz`` is inflated as it arrives.

    With ``validate`` (``header_check``), an upload that starts with the gzip magic is inflated
    into ``volume.nii`` beside ``dest`` by a thread reading ``dest`` as it grows, with the checks
    ``open_upload`` would apply; ``open_upload`` then reads that file instead of inflating again.

    Raises:
        HTTPException: 415 not multipart, 413 over ``max_bytes``, 400 malformed body,
            422 no ``file`` field, the field twice, or an empty file.
        InvalidVolumeError: the inflated header, the grid's work or the gzip stream is refused.
    """
    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"expected a multipart/form-data upload with the volume in the form field '{UPLOAD_FIELD}'",
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise _too_large(max_bytes)
    inflation: _Inflation | None = None
    try:
        with dest.open("wb") as out:
            part = _FilePart(out, max_bytes)
            parser = MultipartParser(params[b"boundary"], part.callbacks())
            try:
                async for chunk in request.stream():
                    parser.write(chunk)
                    if part.too_large:
                        raise _too_large(max_bytes)
                    if inflation is None and validate is not None and part.magic == GZIP_MAGIC \
                            and not part.duplicate:
                        inflation = _Inflation(dest, validate)
                    if inflation is not None:
                        out.flush()  # the inflater reads the file, not this buffer
                        inflation.follower.grow_to(part.size)
                parser.finalize()
            except MultipartParseError:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, "malformed multipart/form-data body") from None
            except ClientDisconnect:  # nobody to answer; the caller still deletes what arrived
                raise HTTPException(status.HTTP_400_BAD_REQUEST, "client disconnected during the upload") from None
        if not part.found:
            got = ", ".join(repr(n) for n in part.other_fields[:5]) or "none"
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"no form field '{UPLOAD_FIELD}' in the upload (fields received: {got}); "
                f"send the volume as {UPLOAD_FIELD}=@volume.nii.gz",
            )
        if part.duplicate:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                f"form field '{UPLOAD_FIELD}' sent more than once; send one volume per request")
        if part.size == 0:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{SOURCE}: empty file (0 bytes)")
        received = Received(part.size, dest)
        if inflation is not None:
            received.inflated = await inflation.wait()
            inflation = None
            dest.unlink()
        return received
    finally:
        if inflation is not None:  # refused or failed: stop the thread before the caller deletes the folder
            await inflation.wait_quietly()


def _check(prefix: bytes, max_voxels: int, check_grid: GridCheck | None) -> CheckedHeader:
    """Every header field (``server.api.header``), then the caller's check of the grid it describes."""
    checked = check_header(prefix, SOURCE, max_voxels)
    if check_grid is not None:
        check_grid(checked.shape, checked.affine)
    return checked


def header_check(max_voxels: int, check_grid: GridCheck | None = None) -> Callable[[bytes], CheckedHeader]:
    """The ``validate`` of ``receive_upload``: the same checks as ``inspect_upload`` and ``open_upload``."""
    return partial(_check, max_voxels=max_voxels, check_grid=check_grid)


def _inflate(fin) -> Iterator[bytes]:
    """Decompressed chunks of a gzip stream (several members allowed), at most ``CHUNK`` each."""
    decomp = _inflater.decompressobj(zlib.MAX_WBITS | 16)
    pending = b""
    while True:
        buf = decomp.unconsumed_tail or pending or fin.read(CHUNK)
        pending = b""
        if not buf:
            if not decomp.eof:
                raise InvalidVolumeError(f"{SOURCE}: gzip stream ends early (truncated upload?)")
            return
        data = decomp.decompress(buf, CHUNK)
        if data:
            yield data
        if decomp.eof:  # end of one member: another may follow, or zero padding
            pending = decomp.unused_data or fin.read(CHUNK)
            while pending and not pending.strip(b"\0"):
                pending = fin.read(CHUNK)
            if not pending:
                return
            decomp = _inflater.decompressobj(zlib.MAX_WBITS | 16)


def _gunzip_stream(fin, fout, validate: Callable[[bytes], CheckedHeader]) -> CheckedHeader:
    """Inflate ``fin`` into ``fout``, validating the header first and never writing far beyond its claim."""
    prefix, checked, written = b"", None, 0
    try:
        for data in _inflate(fin):
            if checked is None:
                prefix += data[: HEADER_PREFIX - len(prefix)]
                if len(prefix) >= HEADER_PREFIX:
                    checked = validate(prefix)
            written += len(data)
            if checked is not None and written > checked.data_bytes + CHUNK:
                raise InvalidVolumeError(f"{SOURCE}: decompresses to more data than its NIfTI header describes")
            fout.write(data)
    except _GZIP_ERRORS:
        raise InvalidVolumeError(f"{SOURCE}: corrupt gzip data (not a valid .nii.gz)") from None
    return checked if checked is not None else validate(prefix)


def _gunzip(src: Path, dest: Path, validate: Callable[[bytes], CheckedHeader]) -> CheckedHeader:
    with src.open("rb") as fin, dest.open("wb") as fout:
        return _gunzip_stream(fin, fout, validate)


def _head(raw: Path) -> bytes:
    """The first ``HEADER_PREFIX`` bytes of the upload, inflated when it is gzip (the rest stays compressed)."""
    with raw.open("rb") as f:
        prefix = f.read(HEADER_PREFIX)
        if prefix[:2] != GZIP_MAGIC:
            return prefix
        f.seek(0)
        head = b""
        try:
            for data in _inflate(f):
                head += data[: HEADER_PREFIX - len(head)]
                if len(head) >= HEADER_PREFIX:
                    break
        except _GZIP_ERRORS:
            raise InvalidVolumeError(f"{SOURCE}: corrupt gzip data (not a valid .nii.gz)") from None
        except InvalidVolumeError:  # ends early: the whole stream is read (and refused) later
            pass
        return head


def inspect_upload(raw: Path, max_voxels: int, check_grid: GridCheck | None = None) -> CheckedHeader | None:
    """Validate a NIfTI upload's header and grid from its first bytes only, in well under a second.

    For a fast answer before the request queues for inference; ``open_upload`` checks again.
    Returns None when the upload does not start like a NIfTI file (``open_upload`` says what it is).

    Raises:
        InvalidVolumeError: a header field or the grid's work beyond a limit (``LimitExceededError``).
    """
    prefix = _head(raw)
    if nifti_class(prefix) is None:
        return None
    return _check(prefix, max_voxels, check_grid)


def open_upload(raw: Path, work_dir: Path, max_voxels: int, check_grid: GridCheck | None = None,
                inflated: CheckedHeader | None = None) -> tuple[np.ndarray, dict]:
    """Validate and read an uploaded ``.nii`` or ``.nii.gz`` as ``(array, meta)`` (see ``shared.io.load_volume``).

    Every header field is checked before voxel data is inflated or read (``server.api.header``),
    then ``check_grid(shape, affine)`` (the work budget), then that the file holds as many bytes
    as the header claims. Recovered fields are written back into the temporary file's header
    (extensions dropped), so the volume is read, and its label map written, on a valid grid.
    ``meta`` gains ``full_shape`` (the header's shape, e.g. ``(X, Y, Z, 1)``), ``nifti_version``
    and ``warnings`` (one sentence per recovered header field). ``inflated``: ``receive_upload``
    already inflated and checked the upload into ``work_dir/volume.nii`` (``Received.inflated``).

    Raises:
        InvalidVolumeError: with a message naming what is wrong.
    """
    path = work_dir / INFLATED_NAME
    validate = header_check(max_voxels, check_grid)
    if inflated is not None:
        return _read_checked(path, inflated, max_voxels)
    with raw.open("rb") as f:
        prefix = f.read(HEADER_PREFIX)
    if is_zip(prefix):  # a zipped DICOM series: server/api/dicom_upload.py
        return open_dicom_upload(raw, work_dir, max_voxels, check_grid)
    if prefix[:2] == GZIP_MAGIC:
        checked = _gunzip(raw, path, validate)
        raw.unlink()
    else:
        raw.replace(path)
        checked = validate(prefix)
    return _read_checked(path, checked, max_voxels)


def _read_checked(path: Path, checked: CheckedHeader, max_voxels: int) -> tuple[np.ndarray, dict]:
    """The voxels of ``path`` whose header ``checked`` describes (``open_upload``'s last half)."""
    size = path.stat().st_size
    if size < checked.data_bytes:
        raise InvalidVolumeError(
            f"{SOURCE}: header describes {checked.data_bytes} bytes of header and voxel data "
            f"but the file holds only {size} (truncated?)"
        )
    with path.open("r+b") as f:  # the repaired header, and no extensions (free text nobody here needs)
        f.write(checked.header.binaryblock)
        f.write(b"\0\0\0\0")
    data, meta = load_volume(path, SOURCE, max_voxels)  # shape and affine checks, then voxels, then NaN/Inf
    if isinstance(data, np.memmap) or data.base is not None:
        data = np.array(data)  # own the voxels: the temporary file is deleted after the response
    meta["full_shape"] = tuple(int(n) for n in meta["header"].get_data_shape())
    meta["nifti_version"] = checked.nifti_version
    meta["warnings"] = list(checked.warnings)
    return data, meta
