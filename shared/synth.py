"""Synthetic multi-site brain MRI built from the real MNI152 ICBM 2009a template.

nilearn ships the T1 template and its grey/white-matter probability maps inside its wheel,
so subjects are made offline: per subject a smooth elastic deformation plus a small random
affine, per-tissue intensity variation and, in a fraction of subjects, a lesion. Each site's
scanner (``shared.scanner``) then maps the clean signal to that site's intensities.

Labels: 0 background (incl. CSF), 1 grey matter, 2 white matter, 3 lesion.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from shared.labels import LABELS
from shared.scanner import REFERENCE_RANGE, ScannerProfile, apply_scanner, smooth_upsample

__all__ = [
    "Subject",
    "SiteSpec",
    "DEMO_SITES",
    "STUDY_SITES",
    "SITE_PRESETS",
    "site_factor",
    "mni_template",
    "synthesize_subject",
    "resample_to_spacing",
    "generate_site",
    "generate_sites",
]



@dataclass
class Subject:
    """One synthetic subject: clean signal on [0, REFERENCE_RANGE], labels and the voxel->mm affine."""

    signal: np.ndarray
    label: np.ndarray
    affine: np.ndarray


@dataclass
class SiteSpec:
    """A demo hospital: its name, scanner and how many train/test subjects it holds."""

    name: str
    profile: ScannerProfile
    n_train: int
    n_test: int


# Strongly different scanners: s spans 0.25..4, b spans -300..+500; hospital-c is small;
# hospital-d also has a gamma curve, a bias field and anisotropic voxels.
DEMO_SITES: tuple[SiteSpec, ...] = (
    SiteSpec("hospital-a", ScannerProfile(scale=1.0, shift=0.0, noise_std=0.01), n_train=8, n_test=3),
    SiteSpec("hospital-b", ScannerProfile(scale=4.0, shift=-300.0, noise_std=0.01), n_train=8, n_test=3),
    SiteSpec("hospital-c", ScannerProfile(scale=0.25, shift=500.0, noise_std=0.01), n_train=3, n_test=2),
    SiteSpec(
        "hospital-d",
        ScannerProfile(
            scale=2.0, shift=150.0, gamma=0.6, bias_strength=0.3, noise_std=0.015, spacing=(2.0, 2.0, 3.0)
        ),
        n_train=6,
        n_test=3,
    ),
)


# The harmonization study (``fedmri generate --preset study``; ``fedmri ablation`` uses it): every
# site differs from a clean reference scanner in ONE factor, so a Dice deficit can be attributed to
# it; ``study-combined`` has all non-affine factors at once. The factor is recorded in scanner.json
# (``extra.factor``). 12 held-out test cases per site for per-site intervals; 5 training cases (small: 2).
_REF_NOISE = 0.01
# Thick slices: 6 mm along z (3x the 2 mm in-plane), resampled by the loader; coarser than the ablation's 3 mm grid.
THICK_SPACING = (2.0, 2.0, 6.0)


def _study(name: str, factor: str, n_train: int = 5, n_test: int = 12, **profile) -> SiteSpec:
    profile = {"noise_std": _REF_NOISE, **profile, "extra": {"factor": factor}}
    return SiteSpec(name, ScannerProfile(**profile), n_train=n_train, n_test=n_test)


STUDY_SITES: tuple[SiteSpec, ...] = (
    _study("study-reference", "none"),
    _study("study-affine-low", "affine", scale=0.2, shift=1000.0),
    _study("study-affine-high", "affine", scale=5.0, shift=-1000.0),
    _study("study-gamma", "gamma", gamma=0.5),
    _study("study-bias", "bias field", bias_strength=0.4),
    _study("study-thick", "thick slices", spacing=THICK_SPACING),
    _study("study-noise", "low SNR", noise_std=0.06),
    _study("study-small", "small site", n_train=2),
    _study("study-combined", "combined", gamma=0.5, bias_strength=0.4, noise_std=0.06, spacing=THICK_SPACING),
)

SITE_PRESETS: dict[str, tuple[SiteSpec, ...]] = {"demo": DEMO_SITES, "study": STUDY_SITES}


def site_factor(site_dir: str | Path) -> str | None:
    """The study factor a site differs in (scanner.json ``extra.factor``), if it records one."""
    path = Path(site_dir) / "scanner.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("extra", {}).get("factor")
    except (OSError, ValueError, AttributeError):
        return None


@lru_cache(maxsize=4)
def mni_template(resolution: float = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The MNI152 2009a T1 (scaled to [0, 1]), GM and WM probability maps and their affine.

    1 and 2 mm come from nilearn; coarser grids (e.g. 4 mm for fast tests) are resampled from 2 mm.
    """
    if resolution not in (1, 2) and not resolution > 2:
        raise ValueError(f"resolution must be 1, 2 or > 2 (mm), got {resolution}")
    if resolution > 2:
        t1, gm, wm, affine = mni_template(2)
        spacing = (float(resolution),) * 3
        t1_r, _, new_affine = resample_to_spacing(t1, t1 > 0, affine, spacing)
        gm_r, wm_r = (resample_to_spacing(v, v > 0, affine, spacing)[0] for v in (gm, wm))
        return t1_r, gm_r, wm_r, new_affine
    from nilearn import datasets  # imported lazily: slow, and only the generator needs it

    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution)
    wm = datasets.load_mni152_wm_template(resolution=resolution)
    t1_data = t1.get_fdata(dtype=np.float32)
    t1_data /= max(float(t1_data.max()), 1e-6)
    return t1_data, gm.get_fdata(dtype=np.float32), wm.get_fdata(dtype=np.float32), t1.affine.copy()


def _random_warp(shape: tuple[int, ...], resolution: float, rng: np.random.Generator) -> np.ndarray:
    """Sampling coordinates of a small random affine composed with a smooth elastic field."""
    shape_arr = np.asarray(shape, dtype=np.float64)
    center = (shape_arr - 1) / 2
    angles = np.deg2rad(rng.uniform(-6, 6, size=3))
    rot = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    matrix = rot @ np.diag(rng.uniform(0.92, 1.08, size=3))
    translation = rng.uniform(-3, 3, size=3) / resolution

    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    flat = grid.reshape(3, -1) - center[:, None]
    coords = (matrix @ flat + center[:, None] + translation[:, None]).reshape(3, *shape)

    # Elastic part: coarse random displacements (mm) upsampled smoothly to the full grid.
    coarse_shape = tuple(max(3, int(n // 12)) for n in shape)
    max_mm = 4.0
    for axis in range(3):
        coarse = rng.normal(0, max_mm / 2, size=coarse_shape)
        coords[axis] += smooth_upsample(coarse, shape) / resolution
    return coords.astype(np.float32)


def _add_lesion(
    signal: np.ndarray, label: np.ndarray, resolution: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Place an irregular ellipsoid lesion inside white matter with its own (hypointense) signal."""
    wm_idx = np.argwhere(ndimage.binary_erosion(label == 2, iterations=2))
    if len(wm_idx) == 0:
        return signal, label
    center = wm_idx[rng.integers(len(wm_idx))]
    radii = rng.uniform(4.0, 9.0, size=3) / resolution
    grid = np.ogrid[tuple(slice(0, n) for n in label.shape)]
    dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii))
    roughness = ndimage.gaussian_filter(rng.normal(0, 1, size=label.shape).astype(np.float32), 1.5)
    blob = (dist + 0.6 * roughness / (roughness.std() + 1e-6) * 0.25) < 1.0
    blob &= label > 0
    if not blob.any():
        return signal, label
    wm_mean = float(signal[label == 2].mean())
    lesion_level = wm_mean * rng.uniform(0.4, 0.65)
    weight = np.clip(ndimage.gaussian_filter(blob.astype(np.float32), 0.7), 0, 1)
    signal = signal * (1 - weight) + lesion_level * weight
    label = label.copy()
    label[blob] = 3
    return signal, label


def synthesize_subject(seed: int, resolution: float = 2, lesion_probability: float = 0.5) -> Subject:
    """Make one subject, deterministic from ``seed``.

    Args:
        seed: random seed; the same seed gives the same subject.
        resolution: template resolution in mm (1, 2, or coarser for quick tests).
        lesion_probability: chance that this subject has a lesion (label 3).
    """
    if not 0 <= lesion_probability <= 1:
        raise ValueError(f"lesion_probability must be in [0, 1], got {lesion_probability}")
    rng = np.random.default_rng(seed)
    t1, gm, wm, affine = mni_template(resolution)
    coords = _random_warp(t1.shape, resolution, rng)
    t1_w, gm_w, wm_w = (ndimage.map_coordinates(v, coords, order=1, mode="constant", cval=0.0) for v in (t1, gm, wm))

    brain = t1_w > 0.05
    other = np.clip(1 - gm_w - wm_w, 0, 1)
    label = np.argmax(np.stack([other, gm_w, wm_w]), axis=0).astype(np.uint8)
    label[~brain] = 0

    # Per-tissue contrast variation between subjects (same scanner, different brains).
    gm_gain, wm_gain = rng.uniform(-0.08, 0.08, size=2)
    signal = t1_w * (1 + gm_gain * gm_w + wm_gain * wm_w)
    if rng.random() < lesion_probability:
        signal, label = _add_lesion(signal, label, resolution, rng)
    signal = np.clip(signal, 0, 1) * REFERENCE_RANGE
    return Subject(signal.astype(np.float32), label, affine)


def resample_to_spacing(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample image (linear) and label (nearest) to ``spacing`` mm, keeping corner voxels aligned."""
    current = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.allclose(current, spacing, atol=1e-3):
        return image, label, affine
    in_shape = np.asarray(image.shape)
    out_shape = np.maximum(2, np.round((in_shape - 1) * current / np.asarray(spacing)).astype(int) + 1)
    zoom = out_shape / in_shape
    image_r = ndimage.zoom(image, zoom, order=1, mode="nearest", grid_mode=False)
    label_r = ndimage.zoom(label, zoom, order=0, mode="nearest", grid_mode=False)
    step = (in_shape - 1) / (out_shape - 1)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] @ np.diag(step)
    return image_r, label_r, new_affine


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def generate_site(
    out_dir: str | Path, spec: SiteSpec, seed: int = 0, resolution: float = 2, lesion_probability: float = 0.5
) -> Path:
    """Write one site in the Medical Segmentation Decathlon layout; returns the site folder.

    Layout: ``imagesTr/ labelsTr/ imagesTs/ labelsTs/ dataset.json`` and ``scanner.json``
    (the site's scanner profile, kept apart from the data a hospital would have).
    """
    site_dir = Path(out_dir) / spec.name
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (site_dir / sub).mkdir(parents=True, exist_ok=True)
    site_key = zlib.crc32(spec.name.encode())  # stable across runs, unlike hash()
    entries: dict[str, list] = {"training": [], "test": []}
    prefix = spec.name.replace("-", "_")
    for split, n, tag in (("training", spec.n_train, "Tr"), ("test", spec.n_test, "Ts")):
        for i in range(n):
            case_seed = np.random.SeedSequence([seed, site_key, 0 if tag == "Tr" else 1, i])
            subject_seed, scanner_seed = case_seed.generate_state(2)
            subject = synthesize_subject(int(subject_seed), resolution, lesion_probability)
            signal, label, affine = resample_to_spacing(
                subject.signal, subject.label, subject.affine, spec.profile.spacing
            )
            image = apply_scanner(signal, spec.profile, np.random.default_rng(int(scanner_seed)))
            name = f"{prefix}_{tag.lower()}{i:03d}.nii.gz"
            _save(image, affine, site_dir / f"images{tag}" / name)
            _save(label.astype(np.uint8), affine, site_dir / f"labels{tag}" / name)
            entries[split].append({"image": f"./images{tag}/{name}", "label": f"./labels{tag}/{name}"})
    dataset = {
        "name": spec.name,
        "description": "Synthetic brain MRI from the MNI152 ICBM 2009a template (fedmri generate)",
        "tensorImageSize": "3D",
        "modality": {"0": "T1"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": spec.n_train,
        "numTest": spec.n_test,
        "training": entries["training"],
        "test": [e["image"] for e in entries["test"]],
    }
    (site_dir / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    spec.profile.to_json(site_dir / "scanner.json")
    return site_dir


def generate_sites(
    out_dir: str | Path,
    sites: tuple[SiteSpec, ...] = DEMO_SITES,
    seed: int = 0,
    resolution: float = 2,
    lesion_probability: float = 0.5,
) -> list[Path]:
    """Write every site of ``sites`` under ``out_dir``."""
    return [generate_site(out_dir, spec, seed, resolution, lesion_probability) for spec in sites]
