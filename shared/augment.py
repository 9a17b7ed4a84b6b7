"""Non-linear intensity augmentation for local training (run config ``augment``).

Instance norm cancels a scanner's ``s*x + b`` exactly but not a gamma curve, a smooth bias field or
noise (``server.report.invariance``). This module perturbs each training crop with exactly those
(MONAI ``RandAdjustContrastd``, ``RandBiasFieldd``, ``RandGaussianNoised``) so the network learns to
tolerate them. Each crop is mapped to [0, 1] first (min/max, per crop) and back afterwards: a gamma
curve and a multiplicative field are defined on a non-negative signal, whatever the site's ``b``.
Training only; evaluation and inference never see it, so the IN network's invariance is untouched.

``OffsetBiasFieldd`` is the milder coil field of the default training chain (run config
``bias-field-prob``, ``shared.data.train_transforms``), measured from each crop's minimum.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import MapTransform, RandBiasFieldd, RandomizableTransform

__all__ = [
    "AUGMENT_GAMMA",
    "AUGMENT_BIAS",
    "BIAS_FIELD_COEFF",
    "AUGMENT_NOISE",
    "intensity_augmentation",
    "AugmentedLoader",
    "OffsetBiasFieldd",
    "PasteLesiond",
]

AUGMENT_GAMMA = (0.5, 2.0)  # gamma range (the study's gamma site is 0.5)
AUGMENT_BIAS = (-0.4, 0.4)  # RandBiasFieldd coefficient range (log-field polynomial)
# Per-crop field of the training chain (``DataConfig.bias_field_prob``): on a 48^3 crop the field's median
# range is 0.67-1.46 (hospital-d's coil field spans 0.7-1.3 over the whole head); AUGMENT_BIAS reaches 0.2-4.5.
BIAS_FIELD_COEFF = (-0.1, 0.1)
AUGMENT_NOISE = 0.06  # max noise std on the [0, 1] crop (the study's low-SNR site: 0.06 of the range)


def intensity_augmentation(prob: float = 0.5):
    """The MONAI chain applied to one channel-first crop in [0, 1]; each transform fires with ``prob``."""
    from monai import transforms as mt

    return mt.Compose(
        [
            mt.RandAdjustContrastd(keys="image", prob=prob, gamma=AUGMENT_GAMMA),
            mt.RandBiasFieldd(keys="image", prob=prob, coeff_range=AUGMENT_BIAS, degree=3),
            mt.RandGaussianNoised(keys="image", prob=prob, mean=0.0, std=AUGMENT_NOISE),
        ]
    )


class AugmentedLoader:
    """Wraps a training loader: yields its batches with every crop's intensities augmented.

    ``len``, ``generator`` and ``dataset`` are the wrapped loader's (``shared.data.reseed_loader``
    still works); the augmentation's own random stream is seeded with ``seed`` (call :meth:`reseed`).
    """

    def __init__(self, loader, seed: int = 0, prob: float = 0.5) -> None:
        self.loader = loader
        self.transform = intensity_augmentation(prob)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.transform.set_random_state(seed=int(seed) % (2**32))

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            yield {**batch, "image": self._augment(batch["image"])}

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for image in images:  # (C, X, Y, Z) per crop
            lo, hi = image.min(), image.max()
            span = torch.clamp(hi - lo, min=1e-6)
            unit = torch.as_tensor((image - lo) / span).as_subclass(torch.Tensor)
            aug = torch.as_tensor(self.transform({"image": unit})["image"], dtype=unit.dtype).as_subclass(torch.Tensor)
            out.append(aug.clamp_min(0) * span + lo)
        return torch.stack(out).as_subclass(torch.Tensor)


class OffsetBiasFieldd(RandBiasFieldd):
    """MONAI ``RandBiasFieldd`` applied to the signal above each crop's minimum: ``lo + (x - lo) * field``.

    A coil field multiplies the signal, not a scanner's offset ``b``; measured from the crop's own
    minimum the result commutes with ``s*x + b`` (``s > 0``), like the range-preserving gamma curve.
    Hospital-d's scanner has a 30 % field that instance norm cannot remove; its 5 training cases hold 5 fields.
    """

    def __init__(self, keys="image", prob: float = 0.3, coeff_range=BIAS_FIELD_COEFF, degree: int = 3) -> None:
        super().__init__(keys=keys, prob=prob, coeff_range=coeff_range, degree=degree)

    def __call__(self, data):
        d = dict(data)
        lows = {key: d[key].min() for key in self.key_iterator(d)}
        for key, lo in lows.items():
            d[key] = d[key] - lo
        d = super().__call__(d)
        for key, lo in lows.items():
            d[key] = d[key] + lo
        return d


class PasteLesiond(RandomizableTransform, MapTransform):
    """Copy annotated lesions to random places in a volume's white matter (copy-paste / CarveMix-style).

    A site holds a handful of annotated lesions; crops centred on them show the network the same few
    blobs in the same surroundings, and it learns those places rather than "a darker blob inside white
    matter". With probability ``prob`` per draw, a lesion (its bounding box, randomly flipped) is copied
    to 1-``max_copies`` random white-matter centres; only voxels that were white matter are overwritten.
    The source is the volume's own lesion or one from ``bank`` (:meth:`collect`: the other training
    volumes of the same site, so the same scanner; shifted by the difference of the two volumes' white
    matter medians). The class indices of the crop sampler (``indices_key``, from ``ClassesToIndicesd``)
    gain the pasted voxels, so lesion-centred crops find them too. Nothing leaves the site. Training only.
    """

    def __init__(self, prob: float = 0.5, image_key: str = "image", label_key: str = "label",
                 indices_key: str = "label_cls_indices", lesion: int = 3, host: int = 2, max_copies: int = 2,
                 max_extent: int = 24) -> None:
        MapTransform.__init__(self, (image_key, label_key))
        RandomizableTransform.__init__(self, prob)
        self.image_key, self.label_key, self.indices_key = image_key, label_key, indices_key
        self.lesion, self.host, self.max_copies, self.max_extent = lesion, host, max_copies, max_extent
        self.bank: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def _host_median(self, image: torch.Tensor, host_idx: np.ndarray) -> float:
        sample = host_idx[self.R.randint(host_idx.size, size=min(host_idx.size, 4096))]
        return float(torch.median(image[0].flatten()[torch.as_tensor(sample)]))

    def _source(self, item) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(image patch, lesion mask, white-matter median)`` of ``item``'s lesion, or None."""
        indices = item[self.indices_key]
        lesion_idx, host_idx = np.asarray(indices[self.lesion]), np.asarray(indices[self.host])
        if lesion_idx.size == 0 or host_idx.size == 0:
            return None
        image, label = item[self.image_key], item[self.label_key]
        coords = np.stack(np.unravel_index(lesion_idx, tuple(label.shape[1:])), axis=1)
        lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
        if (hi - lo).max() > self.max_extent:  # not a focal lesion
            return None
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        patch = torch.as_tensor(image[0][box]).as_subclass(torch.Tensor).clone()
        mask = torch.as_tensor(label[0][box] == self.lesion).as_subclass(torch.Tensor).clone()
        return patch, mask, self._host_median(image, host_idx)

    def collect(self, items) -> int:
        """Bank the lesions of ``items`` (a site's cached training volumes) as extra sources; returns how many."""
        self.bank = [src for src in (self._source(item) for item in items) if src is not None]
        return len(self.bank)

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        indices = d[self.indices_key]
        host_idx = np.asarray(indices[self.host])
        own = self._source(d)
        sources = ([own] if own is not None else []) + self.bank
        if not sources or host_idx.size == 0:
            return d
        image, label = d[self.image_key].clone(), d[self.label_key].clone()
        shape = tuple(label.shape[1:])
        host_median = self._host_median(image, host_idx) if self.bank else 0.0
        added = []
        for _ in range(self.R.randint(1, self.max_copies + 1)):
            patch, mask, median = sources[self.R.randint(len(sources))]
            values = patch + (host_median - median if self.bank else 0.0)
            flip = [axis for axis in range(3) if self.R.rand() < 0.5]
            if flip:
                mask, values = torch.flip(mask, flip), torch.flip(values, flip)
            size = np.asarray(mask.shape)
            start = np.asarray(np.unravel_index(int(host_idx[self.R.randint(host_idx.size)]), shape)) - size // 2
            if (start < 0).any() or (start + size > np.asarray(shape)).any():
                continue
            where = tuple(slice(a, a + n) for a, n in zip(start, size))
            target_image, target_label = image[0][where], label[0][where]
            paste = mask & (target_label == self.host)
            target_image[paste] = values[paste].to(target_image.dtype)
            target_label[paste] = self.lesion
            local = np.argwhere(paste.cpu().numpy()) + start
            added.append(np.ravel_multi_index(tuple(local.T), shape))
        if not added:
            return d
        original = indices[self.lesion]
        merged = np.concatenate([np.asarray(original), *added])
        new_indices = list(indices)
        new_indices[self.lesion] = torch.as_tensor(merged) if isinstance(original, torch.Tensor) else merged
        d[self.image_key], d[self.label_key], d[self.indices_key] = image, label, new_indices
        return d
