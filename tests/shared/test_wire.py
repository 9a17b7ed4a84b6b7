"""The model on the wire as one Array per record (shared.wire): exact round trip, fewer objects, damage refused."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server.federation.strategy import check_update
from shared.model import ModelConfig, build_unet
from shared.wire import (
    PACKED_KEY,
    PACKED_STYPE,
    PackedRecordError,
    is_packed,
    pack_content,
    pack_record,
    unpack_content,
    unpack_record,
)


def _same(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a.keys()) == list(b.keys())
    for key in a:
        x, y = a[key], b[key]
        assert (x.dtype, tuple(x.shape), x.stype, x.data) == (y.dtype, tuple(y.shape), y.stype, y.data), key


def _model_record() -> ArrayRecord:
    state = build_unet(ModelConfig()).state_dict()
    state["step"] = torch.tensor(7, dtype=torch.int64)  # a non-float entry travels too
    return ArrayRecord(torch_state_dict=state)


def test_model_round_trip_is_exact_and_restores_tensors():
    record = _model_record()
    packed = pack_record(record)
    assert is_packed(packed) and list(packed.keys()) == [PACKED_KEY]
    restored = unpack_record(packed)
    _same(record, restored)
    back = restored.to_torch_state_dict()
    assert back["step"].dtype == torch.int64 and int(back["step"]) == 7
    for key, tensor in record.to_torch_state_dict().items():
        assert torch.equal(tensor, back[key])


@pytest.mark.usefixtures("task_identity")  # Flower's Message needs the ClientApp runtime's identity
def test_a_message_carries_far_fewer_objects_packed():
    content = RecordDict({"arrays": _model_record(), "config": ConfigRecord({"global-round": 3})})
    plain = len(get_all_nested_objects(Message(content=content, dst_node_id=1, message_type="train")))
    packed = len(get_all_nested_objects(Message(content=pack_content(content), dst_node_id=1, message_type="train")))
    assert plain >= 30 and packed <= 6, (plain, packed)  # 36 and 6 with Flower 1.41


def test_content_other_records_untouched_and_no_ops():
    config, metrics = ConfigRecord({"a": 1}), MetricRecord({"m": 0.5})
    content = RecordDict({"arrays": _model_record(), "config": config, "metrics": metrics})
    packed = pack_content(content)
    assert packed["config"] is config and packed["metrics"] is metrics
    assert pack_record(packed["arrays"]) is packed["arrays"]  # packing twice changes nothing
    plain = unpack_content(packed)
    _same(content["arrays"], plain["arrays"])
    assert unpack_record(plain["arrays"]) is plain["arrays"]  # a stock Flower peer's record passes through
    no_arrays = RecordDict({"metrics": metrics})
    assert pack_content(no_arrays) is no_arrays and unpack_content(no_arrays) is no_arrays
    empty = ArrayRecord()
    assert pack_record(empty) is empty


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_]),
            shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_any_arrays_round_trip(arrays):
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    restored = unpack_record(pack_record(record))
    _same(record, restored)
    for key, value in arrays.items():
        np.testing.assert_array_equal(restored[key].numpy(), value)


def _blob(record: ArrayRecord) -> bytes:
    return record[PACKED_KEY].data


def _with(blob: bytes) -> ArrayRecord:
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)})


def _manifest(blob: bytes) -> tuple[list, bytes]:
    size = struct.unpack_from("<4sI", blob)[1]
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def _rebuilt(manifest: list, data: bytes) -> bytes:
    head = json.dumps(manifest).encode()
    return struct.pack("<4sI", b"FMPK", len(head)) + head + data


@pytest.mark.parametrize(
    "damage",
    ["truncated", "extra byte", "bad magic", "not json", "duplicate key", "missing field", "tiny"],
)
def test_damaged_packed_record_is_refused_with_a_reason(damage):
    record = _model_record()
    blob = _blob(pack_record(record))
    manifest, data = _manifest(blob)
    bad = {
        "truncated": blob[:-10],
        "extra byte": blob + b"\0",
        "bad magic": b"XXXX" + blob[4:],
        "not json": struct.pack("<4sI", b"FMPK", 5) + b"{nope" + data,
        "duplicate key": _rebuilt([manifest[0], manifest[0]], data[: 2 * manifest[0]["nbytes"]]),
        "missing field": _rebuilt(
            [{k: v for k, v in manifest[0].items() if k != "shape"}], data[: manifest[0]["nbytes"]]
        ),
        "tiny": b"FM",
    }[damage]
    with pytest.raises(PackedRecordError):
        unpack_record(_with(bad))
    # The server's update check names the problem instead of aggregating or crashing.
    expected = {k: tuple(v.shape) for k, v in record.items()}
    assert "packed arrays" in check_update(_with(bad), expected)
    assert check_update(pack_record(record), expected) is None
