"""The upload's gzip stream inflates the same with ISA-L (when installed) and with zlib, errors included."""

from __future__ import annotations

import gzip
import zlib

import nibabel as nib
import numpy as np
import pytest

from server.api import upload
from shared.errors import InvalidVolumeError


def _nii_gz(tmp_path):
    data = np.random.default_rng(0).random((20, 22, 9)).astype(np.float32)
    path = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.2, 2.5, 1.0])), path)
    return data, gzip.compress(path.read_bytes(), 6)


@pytest.mark.parametrize("inflater", ["default", "zlib"])
def test_open_upload_inflates_and_refuses_corrupt_streams(tmp_path, monkeypatch, inflater):
    if inflater == "zlib":
        monkeypatch.setattr(upload, "_inflater", zlib)
    data, packed = _nii_gz(tmp_path)
    for name, content in (("two-members", packed + gzip.compress(b"")), ("plain", packed)):
        work = tmp_path / name
        work.mkdir()
        (work / "raw").write_bytes(content)
        image, meta = upload.open_upload(work / "raw", work, 10**7)
        assert np.array_equal(image, data) and meta["shape"] == data.shape
    corrupt = bytearray(packed)
    corrupt[len(corrupt) // 2: len(corrupt) // 2 + 64] = b"\xff" * 64
    for name, content in (("truncated", packed[: len(packed) // 2]), ("corrupt", bytes(corrupt))):
        work = tmp_path / name
        work.mkdir()
        (work / "raw").write_bytes(content)
        with pytest.raises(InvalidVolumeError):
            upload.open_upload(work / "raw", work, 10**7)
