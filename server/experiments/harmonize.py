"""Input-harmonization baselines for the ablation, from the maintained ``intensity-normalization`` package.

Each method writes a mirror of the data folder with every image harmonized *at its own site*
(labels, dataset.json and scanner.json copied unchanged); the ablation then trains and evaluates
on the mirror exactly as on the original.

- ``whitestripe``: WhiteStripe (Shinohara et al. 2014), per image: z-score on the normal-appearing
  white-matter stripe found in the image's own histogram. Nothing leaves the image.
- ``nyul``: Nyúl & Udupa piecewise-linear histogram standardisation. Each site fits the landmarks
  of its own training images (``NyulNormalizer.fit_population``, one per site); only these
  standard-scale vectors (11 numbers per site) are averaged, as a federation would, and every
  site maps its images onto the averaged scale. No image is pooled.

Foreground masks are label-free (the labels are not available at inference): voxels above
15 % of the image's robust range (1st..99.5th percentile).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from shared.data import find_cases
from shared.training import discover_sites

__all__ = ["METHODS", "foreground_mask", "harmonize_data"]

METHODS = ("nyul", "whitestripe")
MASK_FRACTION = 0.15


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """Label-free head mask: above ``MASK_FRACTION`` of the 1st..99.5th percentile range."""
    lo, hi = np.percentile(data, [1, 99.5])
    return data > lo + MASK_FRACTION * (hi - lo)


def _load(path: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    img = nib.load(path)
    return img, np.asarray(img.get_fdata(dtype=np.float32))


def _save_like(img: nib.Nifti1Image, data: np.ndarray, path: Path) -> None:
    out = nib.Nifti1Image(data.astype(np.float32), img.affine, img.header)
    out.set_data_dtype(np.float32)
    out.header.set_slope_inter(1.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, path)


def _images_of(site_dir: Path) -> tuple[list[str], list[str]]:
    """(training image paths, every image path: training and test)."""
    train = [c["image"] for c in find_cases(site_dir, "train")]
    test = [c["image"] for c in find_cases(site_dir, "test")]
    return train, train + test


def _nyul_scale(paths: list[str]):
    from intensity_normalization import NyulNormalizer
    from intensity_normalization.adapters.images import NumpyImageAdapter

    images, masks = [], []
    for p in paths:
        data = _load(p)[1]
        images.append(NumpyImageAdapter(data))
        masks.append(NumpyImageAdapter(foreground_mask(data).astype(np.float32)))
    return NyulNormalizer().fit_population(images, masks).standard_scale


def _transform(method: str, data: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    from intensity_normalization import NyulNormalizer, WhiteStripeNormalizer
    from intensity_normalization.adapters.images import NumpyImageAdapter

    image, mask = NumpyImageAdapter(data), NumpyImageAdapter(foreground_mask(data).astype(np.float32))
    if method == "whitestripe":
        normalizer = WhiteStripeNormalizer()
        normalizer.fit(image, mask)
        return np.asarray(normalizer.transform(image, mask).get_data(), dtype=np.float32)
    normalizer = NyulNormalizer()
    normalizer._standard_scale, normalizer.is_fitted = np.asarray(scale), True  # the federation's averaged scale
    return np.asarray(normalizer.transform(image, mask).get_data(), dtype=np.float32)


def harmonize_data(data_dir: str | Path, out_dir: str | Path, method: str, sites: list[str] | None = None) -> dict:
    """Write ``out_dir/<site>/`` for every site of ``data_dir`` with its images harmonized by ``method``.

    Returns what was shared between sites (``{"method", "scales": {site: landmarks}, "standard_scale"}``
    for Nyúl; nothing for WhiteStripe). An existing complete mirror (``harmonized.json``) is reused.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    out = Path(out_dir)
    marker = out / "harmonized.json"
    site_dirs = discover_sites(data_dir, sites)
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("method") == method and info.get("sites") == [p.name for p in site_dirs]:
            return info
    info: dict = {"method": method, "sites": [p.name for p in site_dirs], "source": str(data_dir)}
    standard = None
    if method == "nyul":  # per site: landmarks of its own training images; only the landmarks are averaged
        scales = {p.name: _nyul_scale(_images_of(p)[0]) for p in site_dirs}
        standard = np.mean(np.stack(list(scales.values())), axis=0)
        info.update(scales={k: v.tolist() for k, v in scales.items()}, standard_scale=standard.tolist())
    for site_dir in site_dirs:
        target = out / site_dir.name
        shutil.rmtree(target, ignore_errors=True)
        for name in ("dataset.json", "scanner.json"):
            if (site_dir / name).is_file():
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(site_dir / name, target / name)
        for sub in ("labelsTr", "labelsTs"):
            if (site_dir / sub).is_dir():
                shutil.copytree(site_dir / sub, target / sub)
        for path in _images_of(site_dir)[1]:
            img, data = _load(path)
            rel = Path(path).relative_to(site_dir)
            _save_like(img, _transform(method, data, standard), target / rel)
    marker.write_text(json.dumps(info, indent=1) + "\n")
    return info
