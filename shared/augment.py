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

import torch
from monai.transforms import RandBiasFieldd

__all__ = [
    "AUGMENT_GAMMA",
    "AUGMENT_BIAS",
    "BIAS_FIELD_COEFF",
    "AUGMENT_NOISE",
    "intensity_augmentation",
    "AugmentedLoader",
    "OffsetBiasFieldd",
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
