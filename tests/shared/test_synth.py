import json

import nibabel as nib
import numpy as np
import pytest

from shared.labels import LABELS
from shared.scanner import ScannerProfile
from shared.synth import SiteSpec, generate_site, resample_to_spacing, synthesize_subject

SPEC = SiteSpec(
    "h-x", ScannerProfile(scale=2.0, shift=-100.0, noise_std=0.01, spacing=(4.0, 4.0, 4.0)), n_train=2, n_test=1
)


def test_subject_is_deterministic_and_anatomical():
    a, b, c = (
        synthesize_subject(5, resolution=4),
        synthesize_subject(5, resolution=4),
        synthesize_subject(6, resolution=4),
    )
    np.testing.assert_array_equal(a.signal, b.signal)
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(a.signal, c.signal)
    assert set(np.unique(a.label)) <= set(LABELS)
    # Real T1 contrast survives the warp: white matter brighter than grey matter, both above background.
    gm, wm = a.signal[a.label == 1].mean(), a.signal[a.label == 2].mean()
    assert wm > gm > a.signal[a.label == 0].mean()


def test_lesion_gets_its_own_label_and_intensity():
    subject = synthesize_subject(1, resolution=2, lesion_probability=1.0)
    lesion = subject.label == 3
    assert lesion.sum() > 10
    assert subject.signal[lesion].mean() < 0.8 * subject.signal[subject.label == 2].mean()
    assert not (synthesize_subject(1, resolution=4, lesion_probability=0.0).label == 3).any()


def test_generated_site_reads_back_with_nibabel_and_monai(tmp_path):
    from monai.transforms import LoadImage

    site = generate_site(tmp_path, SPEC, seed=3, resolution=4)
    dataset = json.loads((site / "dataset.json").read_text())
    assert dataset["numTraining"] == 2 and dataset["numTest"] == 1
    assert dataset["labels"] == {str(k): v for k, v in LABELS.items()}
    assert ScannerProfile.from_json(site / "scanner.json") == SPEC.profile
    for entry in dataset["training"]:
        img = nib.load(site / entry["image"])
        lab = nib.load(site / entry["label"])
        assert img.shape == lab.shape and len(img.shape) == 3
        np.testing.assert_allclose(img.header.get_zooms(), (4, 4, 4), atol=0.1)
        np.testing.assert_array_equal(img.affine, lab.affine)
        assert img.header["sform_code"] == 1 and img.header["qform_code"] == 1
        assert set(np.unique(np.asarray(lab.dataobj))) <= {0, 1, 2, 3}
        assert {1, 2} <= set(np.unique(np.asarray(lab.dataobj)))
        monai_img = LoadImage(image_only=True)(str(site / entry["image"]))
        assert tuple(monai_img.shape) == img.shape
        np.testing.assert_allclose(monai_img.affine.numpy(), img.affine, atol=1e-5)
        # The scanner's shift is visible in the stored intensities: background sits at b.
        data = np.asarray(img.dataobj)
        assert np.median(data) == pytest.approx(-100.0, abs=40)
    assert len(list((site / "imagesTs").glob("*.nii.gz"))) == 1
    assert len(list((site / "labelsTs").glob("*.nii.gz"))) == 1


def test_same_seed_same_bytes(tmp_path):
    a = generate_site(tmp_path / "a", SPEC, seed=11, resolution=4)
    b = generate_site(tmp_path / "b", SPEC, seed=11, resolution=4)
    c = generate_site(tmp_path / "c", SPEC, seed=12, resolution=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 8  # 3 images, 3 labels, dataset.json, scanner.json
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between runs with the same seed"
    assert (a / "imagesTr" / "h_x_tr000.nii.gz").read_bytes() != (c / "imagesTr" / "h_x_tr000.nii.gz").read_bytes()


def test_anisotropic_site_spacing_is_in_the_affine():
    subject = synthesize_subject(2, resolution=4)
    image, label, affine = resample_to_spacing(subject.signal, subject.label, subject.affine, (4.0, 4.0, 6.0))
    assert image.shape == label.shape
    assert image.shape[2] < subject.signal.shape[2]
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    np.testing.assert_allclose(spacing, (4, 4, 6), rtol=0.05)
    # Corner voxel centres stay where they were in world space.
    far = np.array([*(np.array(image.shape) - 1), 1])
    far_old = np.array([*(np.array(subject.signal.shape) - 1), 1])
    np.testing.assert_allclose(affine @ far, subject.affine @ far_old, atol=1e-6)
