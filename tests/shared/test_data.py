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
        write(
            root / "imagesTr" / f"c{i}.nii.gz", rng.uniform(0, 100, shape).astype(np.float32), np.diag([2, 2, 2, 1.0])
        )
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


@pytest.mark.parametrize(
    "case",
    ["missing_label", "shape_mismatch", "affine_mismatch", "unreadable", "not_nifti", "empty", "absent", "two_d"],
)
def test_bad_site_data_is_refused_naming_the_file(tmp_path, case):
    site = make_site(tmp_path / "site")
    culprit = {
        "missing_label": "c1.nii.gz",
        "shape_mismatch": "c0.nii.gz",
        "affine_mismatch": "c1.nii.gz",
        "unreadable": "c0.nii.gz",
        "not_nifti": "notes.txt",
        "empty": "imagesTr",
        "absent": "nowhere",
        "two_d": "c1.nii.gz",
    }[case]
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


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"roi_size": (4, 4, 4)}, "roi_size"),
        ({"spacing": (0, 1, 1)}, "spacing"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"crop_ratios": (1, 1, 1)}, "crop_ratios"),
        ({"crop_ratios": (0, 0, 0, 0)}, "crop_ratios"),
        ({"gamma_prob": 1.5}, "gamma_prob"),
        ({"bias_field_prob": -0.1}, "bias_field_prob"),
        ({"spatial_prob": 2}, "spatial_prob"),
    ],
)
def test_ill_data_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_sampling_seed_depends_on_seed_site_and_round():
    from shared.data import sampling_seed

    base = sampling_seed(0, "site-a", 1)
    assert base == sampling_seed(0, "site-a", 1)
    assert len({base, sampling_seed(0, "site-a", 2), sampling_seed(0, "site-b", 1), sampling_seed(1, "site-a", 1)}) == 4


def test_reseeded_loader_repeats_a_fresh_loader_and_rounds_differ(tiny_data_dir, tiny_data_config):
    from shared.data import reseed_loader, sampling_seed
    from shared.training import crop_fingerprint

    cases = find_cases(tiny_data_dir / "site-a")
    loader = make_train_loader(cases, tiny_data_config, seed=0)
    first = lambda ld: crop_fingerprint(next(iter(ld))["image"])  # noqa: E731
    seeds = [sampling_seed(0, "site-a", r) for r in (1, 2)]
    reseed_loader(loader, seeds[0])
    round1 = first(loader)
    first(loader)  # the stream moves on ...
    reseed_loader(loader, seeds[0])
    assert first(loader) == round1  # ... and restarts exactly
    assert first(make_train_loader(cases, tiny_data_config, seed=seeds[0])) == round1  # = a fresh process's loader
    reseed_loader(loader, seeds[1])
    assert first(loader) != round1


_FINGERPRINT_SCRIPT = """
import sys
from shared.data import DataConfig, find_cases, make_train_loader, reseed_loader, sampling_seed
from shared.training import crop_fingerprint
site, round_ = sys.argv[1], int(sys.argv[2])
cfg = DataConfig(spacing=(4, 4, 4), roi_size=(32, 32, 32), val_fraction=0.34)
loader = make_train_loader(find_cases(site), cfg, seed=0)   # what the ClientApp caches
reseed_loader(loader, sampling_seed(0, "site-a", round_))  # what it does on every train message
print(repr(crop_fingerprint(next(iter(loader))["image"])))
"""


@pytest.mark.slow
def test_fresh_processes_draw_new_crops_each_round_and_repeat_on_rerun(tiny_data_dir):
    """Native Flower runs every message in a new process: the crops must still change with the round."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def crops(round_: int) -> float:
        out = subprocess.run(
            [sys.executable, "-c", _FINGERPRINT_SCRIPT, str(tiny_data_dir / "site-a"), str(round_)],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return float(out.stdout.strip().splitlines()[-1])

    round1, round2, rerun = crops(1), crops(2), crops(1)
    assert round1 != round2
    assert rerun == round1


def test_gamma_augmentation_commutes_with_the_scanner_affine():
    """The random gamma curve is range-preserving, so it cannot undo what instance norm removes."""
    from monai.transforms import RandAdjustContrastd

    rng = np.random.default_rng(3)
    x = torch.as_tensor(rng.uniform(10, 500, (1, 12, 12, 12)).astype(np.float32))
    outs = []
    for s, b in ((1.0, 0.0), (4.0, -300.0)):
        aug = RandAdjustContrastd(keys="image", prob=1.0, gamma=(0.7, 1.5))
        aug.set_random_state(seed=7)
        outs.append((aug({"image": s * x + b})["image"] - b) / s)
    assert not torch.allclose(outs[0], x, rtol=1e-3)  # it did change the contrast
    assert torch.allclose(outs[0], outs[1], rtol=1e-3, atol=1e-2)


def test_bias_field_augmentation_commutes_with_the_scanner_affine():
    """The coil field acts on the signal above the crop's minimum, so a scanner's offset b does not change it."""
    from shared.augment import OffsetBiasFieldd

    rng = np.random.default_rng(3)
    x = torch.as_tensor(rng.uniform(10, 500, (1, 12, 12, 12)).astype(np.float32))
    outs = []
    for s, b in ((1.0, 0.0), (4.0, -300.0), (0.25, 500.0)):
        aug = OffsetBiasFieldd(prob=1.0)
        aug.set_random_state(seed=7)
        outs.append((aug({"image": s * x + b})["image"] - b) / s)
    assert not torch.allclose(outs[0], x, rtol=1e-2)  # it did apply a field
    for out in outs[1:]:
        assert torch.allclose(outs[0], out, rtol=1e-3, atol=1e-2)
    # a stock RandBiasFieldd on the raw intensities would not commute (the field scales b too)
    from monai.transforms import RandBiasFieldd

    raw = []
    for s, b in ((1.0, 0.0), (4.0, -300.0)):
        stock = RandBiasFieldd(keys="image", prob=1.0, coeff_range=(-0.1, 0.1), degree=3)
        stock.set_random_state(seed=7)
        raw.append((stock({"image": s * x + b})["image"] - b) / s)
    assert not torch.allclose(raw[0], raw[1], rtol=1e-3, atol=1e-2)


def test_training_chain_draws_the_same_crops_with_label_indices_precomputed(tiny_data_dir, tiny_data_config):
    """Class indices are computed once per volume (in the cached head); the crops are those MONAI draws anyway."""
    import copy

    from monai import transforms as mt
    from monai.transforms import RandomizableTrait

    from shared.data import train_transforms

    chain = train_transforms(tiny_data_config)
    steps = chain.flatten().transforms
    first_random = next(i for i, t in enumerate(steps) if isinstance(t, RandomizableTrait))
    assert "ClassesToIndicesd" in [type(t).__name__ for t in steps[:first_random]]
    # the same chain without the precomputed indices: the crop sampler computes them itself
    plain = mt.Compose([copy.deepcopy(t) for t in steps if not isinstance(t, mt.ClassesToIndicesd)])
    crop = next(t for t in plain.transforms if isinstance(t, mt.RandCropByLabelClassesd))
    crop.indices_key = None
    case = find_cases(tiny_data_dir / "site-a")[0]
    item = {"image": case["image"], "label": case["label"]}
    for seed in (0, 5):
        chain.set_random_state(seed=seed)
        plain.set_random_state(seed=seed)
        ours, theirs = chain(dict(item)), plain(dict(item))
        assert len(ours) == len(theirs) == tiny_data_config.samples_per_volume
        for a, b in zip(ours, theirs):
            assert "label_cls_indices" not in a
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_spatial_augmentation_rotates_crops_to_roi_size_with_whole_labels(tiny_data_dir, tiny_data_config):
    """``spatial_prob``: crops cut larger, rotated/scaled and brought to roi_size; labels stay whole classes."""
    from dataclasses import replace

    cases = find_cases(tiny_data_dir / "site-b")
    plain = next(iter(make_train_loader(cases, tiny_data_config, seed=3)))
    spun = next(iter(make_train_loader(cases, replace(tiny_data_config, spatial_prob=1.0), seed=3)))
    assert spun["image"].shape == plain["image"].shape == (4, 1, 32, 32, 32)
    assert spun["label"].shape == plain["label"].shape
    labels = torch.unique(spun["label"])
    assert set(labels.tolist()) <= {0, 1, 2, 3} and labels.max() >= 1  # nearest neighbour: no blended labels
    assert not torch.equal(spun["image"], plain["image"])
