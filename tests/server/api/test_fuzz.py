"""Property: no mutation of a real NIfTI-1/2 file's header or body makes the service answer 5xx.

Seeds are real files (nibabel's own test data: big-endian int16 NIfTI-1, an sform-only uint8
volume, a NIfTI-2 volume) and synthesized ones (LPS float32 NIfTI-1, oblique scaled int16
NIfTI-2). Hypothesis sets header fields to hostile values (NaN, infinities, huge, negative,
unknown codes), flips, truncates or extends the bytes, optionally gzips, and posts the result
to the real app. Every answer must be 200 with a label map on the declared grid, or a JSON 4xx
naming the problem; the upload folder must be empty afterwards.

CI runs a fixed, derandomized set (``FEDMRI_FUZZ_EXAMPLES``, default 100); ``bench/bench_fuzz.py``
runs thousands of random ones.
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.api.config import ApiSettings
from server.api.main import create_app

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
EXAMPLES = int(os.environ.get("FEDMRI_FUZZ_EXAMPLES", "100"))
RANDOM = os.environ.get("FEDMRI_FUZZ_RANDOM") == "1"  # bench: fresh random examples each run

# Numeric header fields and how many entries each has (None: scalar).
FIELDS = [("dim", 8), ("datatype", None), ("bitpix", None), ("pixdim", 8), ("vox_offset", None),
          ("scl_slope", None), ("scl_inter", None), ("qform_code", None), ("sform_code", None),
          ("quatern_b", None), ("quatern_c", None), ("quatern_d", None), ("qoffset_x", None), ("qoffset_y", None),
          ("qoffset_z", None), ("srow_x", 4), ("srow_y", 4), ("srow_z", 4), ("xyzt_units", None),
          ("intent_code", None), ("slice_code", None), ("slice_start", None), ("slice_end", None), ("dim_info", None),
          ("cal_max", None), ("cal_min", None), ("intent_p1", None), ("toffset", None)]
HOSTILE = [0, 1, -1, 2, 3, 4, 5, 7, 8, 9, 16, 64, 255, 256, 512, 2**15 - 1, -(2**15), 2**31 - 1, 2**40,
           float("nan"), float("inf"), float("-inf"), 0.5, -0.5, 1e-30, 1e-7, 1e30, 24.0, 40.0, 1e6,
           1.0000001, 0.7071068]


def _seeds() -> list[bytes]:
    """Uncompressed NIfTI bytes of real and synthesized files."""
    seeds = [(NIBABEL_DATA / "anatomical.nii").read_bytes(),
             gzip.decompress((NIBABEL_DATA / "standard.nii.gz").read_bytes())]
    four_d = nib.load(NIBABEL_DATA / "example_nifti2.nii.gz")
    single = nib.Nifti2Image(np.asanyarray(four_d.dataobj)[..., :1], four_d.affine, four_d.header)
    seeds.append(single.to_bytes())
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in (22, 18, 14)], indexing="ij")
    blob = (100 + 800 * np.exp(-sum(g**2 for g in grid) * 3)).astype(np.float32)
    lps = np.array([[-1.2, 0, 0, 30], [0, 0, 3.0, -40], [0, -2.0, 0, 25], [0, 0, 0, 1]])
    img = nib.Nifti1Image(blob, lps)
    img.header.set_qform(lps, code=1)
    img.header.set_sform(lps, code=2)
    seeds.append(img.to_bytes())
    c, s = np.cos(0.3), np.sin(0.3)
    oblique = np.array([[2 * c, -2 * s, 0, -20], [2 * s, 2 * c, 0, 10], [0, 0, 3.5, 5], [0, 0, 0, 1]])
    img2 = nib.Nifti2Image((blob * 10).astype(np.int16), oblique)
    img2.header.set_qform(oblique, code=2)
    img2.header.set_sform(None, code=0)
    img2.header.set_slope_inter(0.1, -5.0)
    seeds.append(img2.to_bytes())
    return seeds


SEEDS = _seeds()


@st.composite
def mutated_nifti(draw) -> bytes:
    raw = bytearray(SEEDS[draw(st.integers(0, len(SEEDS) - 1))])
    klass = nib.Nifti2Header if int.from_bytes(raw[:4], "little") == 540 or int.from_bytes(raw[:4], "big") == 540 \
        else nib.Nifti1Header
    hdr = klass.from_fileobj(io.BytesIO(bytes(raw[: klass.sizeof_hdr])), check=False)
    for _ in range(draw(st.integers(0, 3))):
        name, size = draw(st.sampled_from(FIELDS))
        value = draw(st.one_of(st.sampled_from(HOSTILE), st.floats(width=32), st.integers(-(2**31), 2**31 - 1)))
        target = hdr[name]
        dtype = target.dtype
        with np.errstate(all="ignore"):
            cast = np.asarray(value, dtype=np.float64).astype(dtype) if dtype.kind == "f" else \
                np.asarray(np.nan_to_num(np.float64(value), posinf=2**62, neginf=-(2**62))).clip(
                    np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
        if size is None:
            hdr[name] = cast
        else:
            hdr[name][draw(st.integers(0, size - 1))] = cast
    raw[: klass.sizeof_hdr] = hdr.binaryblock
    body = draw(st.sampled_from(["keep", "flip", "truncate", "extend", "extension-flag"]))
    if body == "flip":
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(raw) - 1))
            raw[at] ^= draw(st.integers(1, 255))
    elif body == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif body == "extend":
        raw += bytes(draw(st.binary(min_size=1, max_size=512)))
    elif body == "extension-flag" and len(raw) >= klass.sizeof_hdr + 4:
        raw[klass.sizeof_hdr : klass.sizeof_hdr + 4] = draw(st.binary(min_size=4, max_size=4))
    if draw(st.booleans()):
        packed = gzip.compress(bytes(raw), compresslevel=1)
        if draw(st.integers(0, 9)) == 0:  # now and then a damaged stream
            packed = packed[: draw(st.integers(1, max(len(packed) - 1, 1)))]
        return packed
    return bytes(raw)


@pytest.fixture(scope="module")
def fuzz_app(api_registry, tmp_path_factory):
    uploads = tmp_path_factory.mktemp("fuzz-uploads")
    app_settings = ApiSettings(registry_dir=api_registry, upload_dir=uploads, api_key=None, admin_key=None)
    with TestClient(create_app(app_settings), raise_server_exceptions=False) as client:
        yield client, uploads


@settings(max_examples=EXAMPLES, derandomize=not RANDOM, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(content=mutated_nifti(), path=st.sampled_from(["/v1/segment", "/v1/segment/summary"]))
def test_mutated_nifti_is_200_or_json_4xx(fuzz_app, content, path):
    client, uploads = fuzz_app
    response = client.post(path, files={"file": ("scan.nii.gz", content)})
    assert response.status_code == 200 or 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert response.headers["x-model-version"] == "tiny"
    if response.status_code == 200:
        if path.endswith("summary"):
            body = response.json()
            assert body["model_version"] == "tiny" and all(np.isfinite(body["input"]["spacing_mm"]))
        else:
            raw = gzip.decompress(response.content)
            out = (nib.Nifti2Image if int.from_bytes(raw[:4], "little") == 540 else nib.Nifti1Image).from_bytes(raw)
            assert np.all(np.isfinite(out.affine)) and out.get_data_dtype() == np.uint8
    else:
        assert response.headers["content-type"] == "application/json"
        assert response.json()["detail"].startswith("upload") or response.status_code != 422
    assert list(uploads.iterdir()) == []
