"""Non-linear intensity augmentation wraps a training loader (run config ``augment``)."""

from __future__ import annotations

import torch

from shared.augment import AugmentedLoader


def _batches():
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(2, 1, 12, 12, 12, generator=g) * 400 - 300, "label": torch.zeros(2, 1, 12, 12, 12)}]


def test_augmented_batches_are_perturbed_reproducibly_and_labels_untouched():
    raw = _batches()
    a, b, c = AugmentedLoader(raw, seed=1, prob=1.0), AugmentedLoader(raw, seed=1, prob=1.0), AugmentedLoader(raw, 2)
    xa, xb, xc = next(iter(a)), next(iter(b)), next(iter(c))
    assert len(a) == 1 and xa["image"].shape == raw[0]["image"].shape
    assert torch.equal(xa["image"], xb["image"]) and not torch.equal(xa["image"], xc["image"])
    assert not torch.allclose(xa["image"], raw[0]["image"])
    assert xa["label"] is raw[0]["label"]
    # Non-linear: not an affine map of the input (an affine map would be cancelled by instance norm).
    x, y = raw[0]["image"][0].flatten().double(), xa["image"][0].flatten().double()
    fit = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), y[:, None]).solution
    residual = y - (fit[0] * x + fit[1])
    assert residual.std() > 0.01 * y.std()


def test_zero_probability_is_the_identity_on_the_crop_range():
    raw = _batches()
    out = next(iter(AugmentedLoader(raw, seed=0, prob=0.0)))
    assert torch.allclose(out["image"], raw[0]["image"], atol=1e-3)
