"""Site datasets in the Medical Segmentation Decathlon layout, and the MONAI transform chains.

Any folder with ``imagesTr/ labelsTr/`` (and optionally ``imagesTs/ labelsTs/``) of NIfTI
files works; images and labels are paired by file name, so no ``dataset.json`` is needed.
Intensities are left untouched by default: removing each scanner's (s, b) is the network's job
(instance norm). Nothing before the network may insert zeros, so padding is
replicate/border everywhere.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.errors import InvalidSiteError, InvalidVolumeError
from shared.io import check_image_header, is_nifti_path, load_nifti
from shared.labels import NUM_CLASSES

__all__ = [
    "DataConfig",
    "find_cases",
    "validate_cases",
    "split_train_val",
    "preprocess_transforms",
    "train_transforms",
    "make_train_loader",
    "make_eval_dataset",
    "sampling_seed",
    "reseed_loader",
]


@dataclass
class DataConfig:
    """Preprocessing and sampling settings shared by training, evaluation and inference.

    Args:
        spacing: target voxel size in mm (volumes are resampled to it).
        roi_size: training crop and sliding-window size in voxels.
        batch_size: volumes per optimisation step; each contributes ``samples_per_volume``
            crops, so a step sees ``batch_size * samples_per_volume`` crops.
        samples_per_volume: random crops drawn from each loaded volume.
        zscore: z-score each input volume (off by default; an ablation option).
        val_fraction: share of a site's training cases held out for federated validation.
        cache: keep preprocessed volumes in memory (MONAI ``CacheDataset``).
        crop_ratios: relative chance that a training crop is centred on background, grey matter,
            white matter, lesion (MONAI ``RandCropByLabelClassesd``; classes absent from a
            volume are skipped). Lesions are small and in half the subjects, so they get 6x.
        gamma_prob: chance of a random gamma curve (0.7-1.5, range-preserving, so it commutes
            with the scanner's ``s*x+b``) on each training crop: scanners differ by more than an
            affine map (hospital-d's gamma 0.6), and instance norm cannot remove that; 0 turns it off.
        bias_field_prob: chance of a random smooth multiplicative field on the signal above each
            crop's minimum (``shared.augment.OffsetBiasFieldd``; commutes with ``s*x+b``): hospital-d's
            coil field; 0 (default) turns it off.
        spatial_prob: chance of a random rotation (up to ``SPATIAL_ROTATE`` rad about each axis) and
            scaling (``SPATIAL_SCALE``) of each crop (MONAI ``RandAffined``, nnU-Net's spatial
            augmentation). Crops are then cut ``SPATIAL_MARGIN`` larger and resampled to ``roi_size``
            so rotated corners hold image, not padding; 0 (default) turns it off. Not in the demo
            recipe: on the demo sites it left lesion Dice unchanged and cost tissue Dice (README).
        lesion_paste_prob: chance per volume draw that a lesion of this site's training volumes (its own
            or another's) is copied to 1-2 random places in its white matter before the crops are drawn
            (``shared.augment.PasteLesiond``); 0 turns it off.
    """

    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    roi_size: tuple[int, int, int] = (64, 64, 64)
    batch_size: int = 2
    samples_per_volume: int = 2
    zscore: bool = False
    val_fraction: float = 0.25
    cache: bool = True
    crop_ratios: tuple[float, ...] = field(default=(1.0, 1.0, 1.0, 6.0))
    gamma_prob: float = 0.3
    bias_field_prob: float = 0.0
    spatial_prob: float = 0.0
    lesion_paste_prob: float = 0.0

    def __post_init__(self) -> None:
        self.spacing = tuple(float(v) for v in self.spacing)
        self.roi_size = tuple(int(v) for v in self.roi_size)
        self.crop_ratios = tuple(float(v) for v in self.crop_ratios)
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers, got {self.spacing}")
        if len(self.roi_size) != 3 or min(self.roi_size) < 8:
            raise ValueError(f"roi_size must be three integers >= 8, got {self.roi_size}")
        if self.batch_size < 1 or self.samples_per_volume < 1:
            raise ValueError("batch_size and samples_per_volume must be >= 1")
        if len(self.crop_ratios) != NUM_CLASSES or min(self.crop_ratios) < 0 or not any(self.crop_ratios):
            raise ValueError(
                f"crop_ratios must be {NUM_CLASSES} non-negative numbers, not all 0, got {self.crop_ratios}"
            )
        for name in ("gamma_prob", "bias_field_prob", "spatial_prob", "lesion_paste_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def _case_name(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def find_cases(site_dir: str | Path, split: str = "train") -> list[dict[str, str]]:
    """List ``{"image", "label", "name"}`` cases of a site folder for ``split`` ("train" or "test").

    Raises:
        InvalidSiteError: folder missing or empty, or an image without a label (names the file).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    site = Path(site_dir)
    if not site.is_dir():
        raise InvalidSiteError(f"site folder not found: {site}")
    tag = "Tr" if split == "train" else "Ts"
    images_dir, labels_dir = site / f"images{tag}", site / f"labels{tag}"
    images = (
        sorted(p for p in images_dir.glob("*") if p.is_file() and not p.name.startswith("."))
        if images_dir.is_dir()
        else []
    )
    if not images:
        raise InvalidSiteError(f"{site}: no images in images{tag}/ (expected the Decathlon layout imagesTr/ labelsTr/)")
    cases = []
    for image in images:
        if not is_nifti_path(image):
            raise InvalidSiteError(f"{image}: not a NIfTI file (expected .nii or .nii.gz)")
        label = labels_dir / image.name
        if not label.is_file():
            raise InvalidSiteError(f"{image}: no label file {label.name} in labels{tag}/")
        cases.append({"image": str(image), "label": str(label), "name": _case_name(image)})
    return cases


def validate_cases(cases: list[dict[str, str]]) -> None:
    """Check each pair from headers only: readable NIfTI, 3-D, same shape and affine for image and label."""
    for case in cases:
        headers = {}
        for key in ("image", "label"):
            try:
                img = load_nifti(case[key], source=case[key])
                headers[key] = (check_image_header(img, source=case[key]), img.affine)
            except InvalidVolumeError as exc:
                raise InvalidSiteError(str(exc)) from None
        (shape_i, aff_i), (shape_l, aff_l) = headers["image"], headers["label"]
        if shape_i != shape_l:
            raise InvalidSiteError(f"{case['label']}: label shape {shape_l} does not match image shape {shape_i}")
        if not np.allclose(aff_i, aff_l, atol=1e-3):
            raise InvalidSiteError(f"{case['label']}: label affine does not match the image affine")


def split_train_val(cases: list[dict], val_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic split of a site's training cases; keeps at least one case on each side when possible."""
    if len(cases) < 2 or val_fraction <= 0:
        return list(cases), list(cases[:0])
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
    val = [cases[i] for i in sorted(order[:n_val])]
    train = [cases[i] for i in sorted(order[n_val:])]
    return train, val


def preprocess_transforms(cfg: DataConfig, keys: tuple[str, ...] = ("image", "label")) -> list:
    """Load, channel-first, RAS orientation, resample to ``cfg.spacing``; border padding, no zeros added."""
    from monai import transforms as mt

    modes = tuple("bilinear" if k == "image" else "nearest" for k in keys)
    chain = [
        mt.LoadImaged(keys=keys, image_only=False),
        mt.EnsureChannelFirstd(keys=keys),
        mt.Orientationd(keys=keys, axcodes="RAS", labels=None),
        mt.Spacingd(keys=keys, pixdim=cfg.spacing, mode=modes, padding_mode="border"),
        mt.EnsureTyped(keys="image", dtype=np.float32),
    ]
    if cfg.zscore:
        chain.append(mt.NormalizeIntensityd(keys="image"))
    return chain


_INDICES_POSTFIX = "_cls_indices"
SPATIAL_ROTATE = 0.26  # rad (15 degrees) about each axis
SPATIAL_SCALE = 0.15  # zoom factor in 1 +- 0.15
SPATIAL_MARGIN = 1.25  # crop side before RandAffined, relative to roi_size


def train_transforms(cfg: DataConfig):
    from monai import transforms as mt

    from shared.augment import OffsetBiasFieldd, PasteLesiond

    spatial = cfg.spatial_prob > 0
    crop = tuple(int(round(r * SPATIAL_MARGIN)) for r in cfg.roi_size) if spatial else cfg.roi_size
    return mt.Compose(
        preprocess_transforms(cfg)
        + [
            mt.SpatialPadd(keys=("image", "label"), spatial_size=crop, mode="replicate"),
            # Each class's voxel indices, once per volume (cached with it): the crop sampler would
            # otherwise recompute them on every draw (loader time per demo step 45 -> 34 ms).
            mt.ClassesToIndicesd(keys="label", num_classes=NUM_CLASSES, indices_postfix=_INDICES_POSTFIX),
        ]
        + ([PasteLesiond(prob=cfg.lesion_paste_prob, indices_key="label" + _INDICES_POSTFIX)]
           if cfg.lesion_paste_prob > 0 else [])
        + [
            mt.RandCropByLabelClassesd(
                keys=("image", "label"),
                label_key="label",
                spatial_size=crop,
                num_classes=NUM_CLASSES,
                ratios=list(cfg.crop_ratios),
                num_samples=cfg.samples_per_volume,
                indices_key="label" + _INDICES_POSTFIX,
                warn=False,
            ),
        ]
        # Rotated and scaled about the crop's centre (the sampled class voxel) and cut to roi_size; without
        # the draw it is a plain centre crop. Border padding: training only, never the inference path.
        + ([mt.RandAffined(keys=("image", "label"), prob=cfg.spatial_prob, spatial_size=cfg.roi_size,
                           rotate_range=(SPATIAL_ROTATE,) * 3, scale_range=(SPATIAL_SCALE,) * 3,
                           mode=("bilinear", "nearest"), padding_mode="border")] if spatial else [])
        + [mt.RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=0)]
        + ([mt.RandAdjustContrastd(keys="image", prob=cfg.gamma_prob, gamma=(0.7, 1.5))] if cfg.gamma_prob > 0 else [])
        + ([OffsetBiasFieldd("image", prob=cfg.bias_field_prob)] if cfg.bias_field_prob > 0 else [])
    )


def sampling_seed(seed: int, site: str, round_: int) -> int:
    """The data-sampling seed of one site in one federated round, from ``(seed, site, round)``.

    Native Flower starts a fresh ClientApp process per message, so a loader seeded once would
    draw the same crops, flips and order every round; deriving the seed from the round gives new
    crops each round in both modes, and the same ones again when a run is repeated.
    """
    words = [int(seed), zlib.crc32(str(site).encode()), int(round_)]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint32)[0])


def reseed_loader(loader, seed: int) -> None:
    """Restart a :func:`make_train_loader` loader's random streams (crops, flips, order) from ``seed``.

    After this the loader yields exactly what a new loader made with ``seed`` would yield,
    whatever it drew before (cached volumes are kept).
    """
    from monai.data.utils import set_rnd

    loader.generator.manual_seed(int(seed))
    set_rnd(loader.dataset, int(seed))


def _dataset(data: list[dict], transform, cfg: DataConfig):
    """In-memory ``CacheDataset`` (through the site's disk cache inside ``shared.cache.use_site_cache``) or plain."""
    import monai.data as md

    from shared.cache import active_site_cache, cached_dataset

    if not cfg.cache:
        return md.Dataset(data, transform)
    site_cache = active_site_cache()
    if site_cache is not None:
        return cached_dataset(data, transform, cfg, site_cache)
    return md.CacheDataset(data, transform, cache_rate=1.0, num_workers=0, progress=False)


def _bank_lesions(ds, transform) -> None:
    """Give the chain's ``PasteLesiond`` the lesions of all of this site's cached training volumes."""
    from shared.augment import PasteLesiond

    cached = getattr(ds, "_cache", None)
    for step in transform.flatten().transforms:
        if isinstance(step, PasteLesiond) and cached:
            step.collect(cached)


def make_train_loader(cases: list[dict], cfg: DataConfig, seed: int = 0):
    """A shuffling MONAI DataLoader of random labelled crops; its random streams come from ``seed`` alone."""
    import monai.data as md
    import torch

    if not cases:
        raise InvalidSiteError("no training cases")
    transform = train_transforms(cfg)
    data = [{"image": c["image"], "label": c["label"]} for c in cases]
    ds = _dataset(data, transform, cfg)
    _bank_lesions(ds, transform)
    generator = torch.Generator().manual_seed(seed)
    loader = md.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=0, generator=generator)
    reseed_loader(loader, seed)
    return loader


def make_eval_dataset(cases: list[dict], cfg: DataConfig):
    """Whole preprocessed volumes (image and label), one per case, for sliding-window evaluation."""
    from monai import transforms as mt

    data = [{"image": c["image"], "label": c["label"], "name": c.get("name", "")} for c in cases]
    transform = mt.Compose(preprocess_transforms(cfg))
    return _dataset(data, transform, cfg)
