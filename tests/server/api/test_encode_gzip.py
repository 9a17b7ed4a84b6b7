"""The returned label map: gzip (ISA-L when installed) that nibabel reads back exactly, header kept."""

import nibabel as nib
import numpy as np

from server.api.inference import Segmentation, encode_segmentation


def test_encoded_label_map_round_trips(tmp_path):
    affine = np.array([[-1.0, 0, 0, 90], [0, 1.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    meta = {"header": img.header, "affine": affine, "shape": (5, 6, 7)}
    labels = np.random.default_rng(0).integers(0, 4, (5, 6, 7)).astype(np.uint8)
    data = encode_segmentation(Segmentation(labels, None, meta, None), tmp_path)
    assert data[:2] == b"\x1f\x8b"  # gzip, as the .nii.gz name promises
    (tmp_path / "seg.nii.gz").write_bytes(data)
    back = nib.load(str(tmp_path / "seg.nii.gz"))
    assert np.array_equal(np.asarray(back.dataobj), labels) and back.get_data_dtype() == np.uint8
    assert np.allclose(back.affine, affine)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 2
    assert list(tmp_path.iterdir()) == [tmp_path / "seg.nii.gz"]  # the temporary file is gone
