"""One Array per ArrayRecord on the wire.

Flower 1.41 sends a message as a tree of content-addressed objects (message, record dict, each
record, each Array, each Array's chunks) and every object is its own request at every hop:
ServerApp -> SuperLink -> SuperNode -> ClientApp and back. The demo UNet's 20 tensors made ~45
objects per message, fetched a few at a time, which was most of a native message's start-up.
:func:`pack_content` turns each ArrayRecord into a one-Array record (the arrays' own serialized
bytes back to back after a small JSON manifest); :func:`unpack_content` restores the original
Arrays byte for byte. Both are no-ops on content that is already in the other form, and the ClientApp
answers in the form it was sent, so a peer that does not pack (a stock Flower app) still interoperates.
"""

from __future__ import annotations

import json
import struct

from flwr.app import Array, ArrayRecord, RecordDict

__all__ = [
    "PACKED_KEY",
    "PACKED_STYPE",
    "PackedRecordError",
    "pack_record",
    "unpack_record",
    "pack_content",
    "unpack_content",
    "is_packed",
]

PACKED_KEY = "fedmri.packed"
PACKED_STYPE = "fedmri.packed-arrays/v1"
_MAGIC = b"FMPK"
_HEAD = struct.Struct("<4sI")  # magic, manifest length
_MAX_MANIFEST = 16 << 20


class PackedRecordError(ValueError):
    """A packed record whose bytes do not match its manifest."""


def is_packed(record) -> bool:
    return (
        isinstance(record, ArrayRecord)
        and list(record.keys()) == [PACKED_KEY]
        and record[PACKED_KEY].stype == PACKED_STYPE
    )


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """``record`` as one Array (dtype uint8, stype :data:`PACKED_STYPE`); an empty or packed one as is."""
    if not len(record) or is_packed(record):
        return record
    manifest = [
        {"key": key, "dtype": array.dtype, "shape": list(array.shape), "stype": array.stype, "nbytes": len(array.data)}
        for key, array in record.items()
    ]
    head = json.dumps(manifest, separators=(",", ":")).encode()
    blob = b"".join([_HEAD.pack(_MAGIC, len(head)), head, *(array.data for array in record.values())])
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)})


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The original ArrayRecord of a packed one (same keys, order, dtypes, shapes and bytes); others as is.

    Raises :class:`PackedRecordError` when the bytes do not match the manifest."""
    if not is_packed(record):
        return record
    blob = memoryview(record[PACKED_KEY].data)
    if len(blob) < _HEAD.size:
        raise PackedRecordError("packed arrays: shorter than their header")
    magic, size = _HEAD.unpack_from(blob)
    if magic != _MAGIC or size > min(_MAX_MANIFEST, len(blob) - _HEAD.size):
        raise PackedRecordError("packed arrays: bad header")
    try:
        manifest = json.loads(bytes(blob[_HEAD.size : _HEAD.size + size]))
        entries = [
            (str(e["key"]), str(e["dtype"]), tuple(int(v) for v in e["shape"]), str(e["stype"]), int(e["nbytes"]))
            for e in manifest
        ]
    except (ValueError, TypeError, KeyError) as exc:
        raise PackedRecordError(f"packed arrays: unreadable manifest ({type(exc).__name__})") from None
    offset = _HEAD.size + size
    if len({e[0] for e in entries}) != len(entries) or any(e[4] < 0 for e in entries):
        raise PackedRecordError("packed arrays: duplicate keys or negative sizes in the manifest")
    if offset + sum(e[4] for e in entries) != len(blob):
        raise PackedRecordError("packed arrays: the manifest's sizes do not add up to the data")
    arrays = {}
    for key, dtype, shape, stype, nbytes in entries:
        arrays[key] = Array(dtype=dtype, shape=shape, stype=stype, data=bytes(blob[offset : offset + nbytes]))
        offset += nbytes
    return ArrayRecord(arrays)


def _convert(content: RecordDict, convert) -> RecordDict:
    if not any(isinstance(record, ArrayRecord) for record in content.values()):
        return content
    return RecordDict(
        {key: convert(record) if isinstance(record, ArrayRecord) else record for key, record in content.items()}
    )


def pack_content(content: RecordDict) -> RecordDict:
    """A RecordDict with every ArrayRecord packed (other records are the same objects)."""
    return _convert(content, pack_record)


def unpack_content(content: RecordDict) -> RecordDict:
    """A RecordDict with every packed ArrayRecord restored; raises :class:`PackedRecordError` on a bad one."""
    return _convert(content, unpack_record)
