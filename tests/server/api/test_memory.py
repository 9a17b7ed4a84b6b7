"""HeapTrimmer: freed heap goes back to the OS only beyond the retained allowance, and /v1/segment uses it."""

from __future__ import annotations

import ctypes.util
import sys

import numpy as np
import pytest

from server.api.memory import HeapTrimmer, rss_bytes

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None or rss_bytes() is None,
    reason="malloc_trim and /proc/self/statm are glibc/Linux facts",
)
MIB = 1024**2


def _fragmented_free_heap(total_mib: int) -> list[bytearray]:
    """Free ``total_mib / 2`` MiB of small heap chunks between live ones, so free() alone cannot return them."""
    chunks = [bytearray(b"\1" * (64 * 1024)) for _ in range(total_mib * 16)]
    keep = chunks[1::2]
    del chunks
    return keep


@glibc_only
def test_trimmer_returns_free_heap_beyond_the_allowance():
    trimmer = HeapTrimmer(retain=32 * MIB)
    assert trimmer.after_request()  # the first call always trims: it sets the floor
    floor = trimmer.floor
    assert floor is not None and floor > 0
    assert not trimmer.after_request()  # nothing piled up since

    keep = _fragmented_free_heap(256)  # ~128 MiB freed inside the heap, ~128 MiB live
    before = rss_bytes()
    assert before > floor + trimmer.retain
    assert trimmer.after_request()
    assert rss_bytes() < before - 64 * MIB  # the freed half went back to the OS
    assert trimmer.trims == 2
    del keep


@glibc_only
def test_trimmer_keeps_free_heap_within_the_allowance():
    trimmer = HeapTrimmer(retain=1024 * MIB)
    trimmer.after_request()
    keep = _fragmented_free_heap(128)
    before = rss_bytes()
    assert not trimmer.after_request()  # kept for the next request: no page faults to pay again
    assert rss_bytes() > before - 16 * MIB
    assert trimmer.trims == 1
    del keep


@glibc_only
def test_zero_retain_trims_whenever_rss_rose():
    trimmer = HeapTrimmer(retain=0)
    assert trimmer.after_request()
    keep = _fragmented_free_heap(64)
    assert trimmer.after_request()  # any growth past the floor is trimmed
    assert trimmer.trims == 2
    del keep


@pytest.mark.parametrize("retain_mib", [0, 1 << 20])
def test_segment_requests_trim_per_the_setting(make_client, nifti_bytes, phantom, retain_mib):
    client = make_client(heap_retain_mib=retain_mib)
    trimmer = client.app.state.heap_trimmer
    assert trimmer.retain == retain_mib * MIB
    decisions = []  # the real trimmer decides; this only records what it decided, request by request
    decide = trimmer.after_request
    trimmer.after_request = lambda: decisions.append(decide()) or decisions[-1]
    content = nifti_bytes(phantom(), np.diag([2.0, 2.0, 2.0, 1.0]))
    for _ in range(3):
        assert client.post("/v1/segment", files={"file": ("scan.nii.gz", content)}).status_code == 200
    bad = client.post("/v1/segment", files={"file": ("scan.nii.gz", b"not a volume")})
    assert bad.status_code == 422 and "detail" in bad.json()  # bad input still reaches the trimmer
    assert len(decisions) == 4  # once per request, the refused one included (its buffers are freed too)
    assert decisions[0] and trimmer.trims == sum(decisions)  # the first sets the floor
    if retain_mib:  # a terabyte's allowance: nothing after the first
        assert decisions == [True, False, False, False]
