"""The site loader on real files: our own sites, a foreign NIfTI, and every bad-data case."""

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from shared.data import DataConfig, find_cases, make_eval_dataset, make_train_loader, split_train_val, validate_cases
from shared.errors import InvalidSiteError
from shared.training import load_site

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def make_site(root: Path, n: int = 2, shape=(20, 24, 16)) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        write(root / "imagesTr" / f"c{i}.nii.gz", rng.uniform(0, 100, shape).astype(np.float32), np.diag([2, 2, 2, 1.0]))
        write(root / "labelsTr" / f"c{i}.nii.gz", rng.integers(0, 4, shape).astype(np.uint8), np.diag([2, 2, 2, 1.0]))
    return root


def test_demo_site_loads_and_splits(tiny_data_dir, tiny_data_config):
    site = load_site(tiny_data_dir / "site-a", tiny_data_config, with_test=True)
    assert len(site.train) + len(site.val) == 3 and len(site.val) == 1 and len(site.test) == 1
    item = make_eval_dataset(site.val, tiny_data_config)[0]
    assert item["image"].shape[0] == 1 and item["image"].shape == item["label"].shape
    assert set(torch.unique(item["label"]).tolist()) <= {0, 1, 2, 3}


def test_train_loader_gives_labelled_crops(tiny_data_dir, tiny_data_config):
    cases = find_cases(tiny_data_dir / "site-b")
    batch = next(iter(make_train_loader(cases, tiny_data_config)))
    # 2 volumes x 2 crops each
    assert batch["image"].shape == (4, 1, 32, 32, 32) and batch["label"].shape == (4, 1, 32, 32, 32)
    assert batch["label"].max() >= 1


def test_anisotropic_site_is_resampled_to_the_target_spacing(tmp_path):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    write(tmp_path / "s" / "imagesTr" / "a.nii.gz", np.ones((20, 20, 10), np.float32), affine)
    write(tmp_path / "s" / "labelsTr" / "a.nii.gz", np.ones((20, 20, 10), np.uint8), affine)
    item = make_eval_dataset(find_cases(tmp_path / "s"), DataConfig(spacing=(2, 2, 2)))[0]
    assert item["image"].shape[1:3] == (20, 20) and item["image"].shape[3] in (14, 15)


def test_preprocessing_commutes_with_the_scanner_affine(tmp_path):
    """No zeros are inserted between the file and the network: preprocess(s*x+b) == s*preprocess(x)+b."""
    rng = np.random.default_rng(1)
    data = rng.uniform(0, 1000, (17, 21, 13)).astype(np.float32)
    # Oblique, flipped, anisotropic: exercises Orientationd and Spacingd at the borders.
    affine = np.array([[-1.7, 0.3, 0, 10], [0.2, 2.1, 0, -4], [0, 0, 3.2, 2], [0, 0, 0, 1]])
    labels = rng.integers(0, 4, data.shape).astype(np.uint8)
    s, b = 0.25, 500.0
    for name, values in (("raw", data), ("shifted", s * data + b)):
        write(tmp_path / name / "imagesTr" / "x.nii.gz", values.astype(np.float32), affine)
        write(tmp_path / name / "labelsTr" / "x.nii.gz", labels, affine)
    cfg = DataConfig(spacing=(2, 2, 2), cache=False)
    raw = make_eval_dataset(find_cases(tmp_path / "raw"), cfg)[0]["image"]
    shifted = make_eval_dataset(find_cases(tmp_path / "shifted"), cfg)[0]["image"]
    err = (shifted - (s * raw + b)).abs().max().item()
    assert err < 1e-2, f"preprocessing does not commute with s*x+b (max error {err})"


def test_foreign_nifti_from_nibabel_loads(tmp_path):
    """A real scan nibabel ships (anatomical.nii), dropped into a site folder as a hospital would."""
    src = NIBABEL_DATA / "anatomical.nii"
    img = nib.load(src)
    site = tmp_path / "hospital-x"
    (site / "imagesTr").mkdir(parents=True)
    shutil.copy(src, site / "imagesTr" / "anat.nii")
    data = np.asarray(img.dataobj)
    write(site / "labelsTr" / "anat.nii", (data > np.percentile(data, 60)).astype(np.uint8), img.affine)
    cases = find_cases(site)
    validate_cases(cases)
    item = make_eval_dataset(cases, DataConfig(spacing=(3, 3, 3)))[0]
    assert item["image"].ndim == 4 and item["image"].shape == item["label"].shape
    assert float(item["image"].max()) > 0


@pytest.mark.parametrize("case", ["missing_label", "shape_mismatch", "affine_mismatch", "unreadable", "not_nifti", "empty", "absent", "two_d"])
def test_bad_site_data_is_refused_naming_the_file(tmp_path, case):
    site = make_site(tmp_path / "site")
    culprit = {"missing_label": "c1.nii.gz", "shape_mismatch": "c0.nii.gz", "affine_mismatch": "c1.nii.gz",
               "unreadable": "c0.nii.gz", "not_nifti": "notes.txt", "empty": "imagesTr", "absent": "nowhere", "two_d": "c1.nii.gz"}[case]
    if case == "missing_label":
        (site / "labelsTr" / "c1.nii.gz").unlink()
    elif case == "shape_mismatch":
        write(site / "labelsTr" / "c0.nii.gz", np.zeros((20, 24, 15), np.uint8), np.diag([2, 2, 2, 1.0]))
    elif case == "affine_mismatch":
        write(site / "labelsTr" / "c1.nii.gz", np.zeros((20, 24, 16), np.uint8), np.diag([1, 2, 2, 1.0]))
    elif case == "unreadable":
        (site / "imagesTr" / "c0.nii.gz").write_bytes(gzip.compress(b"this is not a NIfTI header at all" * 20))
    elif case == "not_nifti":
        (site / "imagesTr" / "notes.txt").write_text("scanner log")
    elif case == "empty":
        shutil.rmtree(site)
        (site / "imagesTr").mkdir(parents=True)
    elif case == "absent":
        site = tmp_path / "nowhere"
    elif case == "two_d":
        write(site / "imagesTr" / "c1.nii.gz", np.zeros((20, 24), np.float32), np.diag([2, 2, 2, 1.0]))
    with pytest.raises(InvalidSiteError, match=culprit.replace(".", r"\.")):
        validate_cases(find_cases(site))


def test_split_is_deterministic_and_disjoint():
    cases = [{"image": str(i)} for i in range(10)]
    train, val = split_train_val(cases, 0.3, seed=4)
    assert (train, val) == split_train_val(cases, 0.3, seed=4)
    assert len(val) == 3 and not {c["image"] for c in train} & {c["image"] for c in val}
    assert split_train_val(cases[:1], 0.3) == (cases[:1], [])


@pytest.mark.parametrize("kwargs,match", [({"roi_size": (4, 4, 4)}, "roi_size"), ({"spacing": (0, 1, 1)}, "spacing"),
                                          ({"val_fraction": 1.0}, "val_fraction"), ({"batch_size": 0}, "batch_size")])
def test_ill_data_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)
