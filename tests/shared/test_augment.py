"""Non-linear intensity augmentation wraps a training loader (run config ``augment``)."""

from __future__ import annotations

import numpy as np
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


def _lesion_volume(shape=(40, 40, 40)):
    """White matter block in background, one darker 5x4x3 lesion inside; class indices from ClassesToIndicesd."""
    from monai.transforms import ClassesToIndicesd

    label = torch.zeros((1, *shape))
    label[0, 5:35, 5:35, 5:35] = 2
    label[0, 10:15, 10:14, 10:13] = 3
    image = torch.where(label == 2, 800.0, 20.0)
    image[label == 3] = 500.0
    indices = ClassesToIndicesd(keys="label", num_classes=4, indices_postfix="_cls_indices")
    return indices({"image": image, "label": label})


def test_lesion_paste_copies_the_lesion_into_white_matter_and_its_crop_indices():
    from shared.augment import PasteLesiond

    item = _lesion_volume()
    paste = PasteLesiond(prob=1.0, max_copies=2)
    grew = False
    for seed in range(5):
        paste.set_random_state(seed)
        out = paste(item)
        lesion = out["label"][0] == 3
        flat = out["label"][0].flatten()
        idx = torch.as_tensor(out["label_cls_indices"][3]).long()
        assert torch.all(flat[idx] == 3) and len(torch.unique(idx)) == int(lesion.sum())  # the sampler sees them all
        assert torch.all(out["image"][0][lesion] == 500.0)  # the lesion's own intensities
        assert torch.equal(out["label"][0] == 0, item["label"][0] == 0)  # only white matter is overwritten
        grew |= int(lesion.sum()) > 60
    assert grew
    assert int((item["label"] == 3).sum()) == 60  # the cached input is not modified


def test_lesion_paste_leaves_lesion_free_volumes_and_probability_zero_alone():
    from shared.augment import PasteLesiond

    item = _lesion_volume()
    assert PasteLesiond(prob=0.0)(item)["label"] is item["label"]
    free = dict(item)
    free["label_cls_indices"] = [*item["label_cls_indices"][:3], np.zeros(0, dtype=np.int64)]
    assert PasteLesiond(prob=1.0)(free)["label"] is item["label"]


def test_lesion_paste_brings_a_banked_lesion_into_a_lesion_free_volume():
    """A site's other volumes lend their lesions, shifted by the difference of the white-matter medians."""
    from shared.augment import PasteLesiond

    donor = _lesion_volume()
    free = _lesion_volume()
    free["label"] = torch.where(free["label"] == 3, 2.0, free["label"])
    free["image"] = torch.where(free["label"] == 2, 900.0, 20.0)  # this subject's white matter is 100 brighter
    free["label_cls_indices"] = [*free["label_cls_indices"][:2],
                                 np.flatnonzero(free["label"][0].numpy().ravel() == 2), np.zeros(0, dtype=np.int64)]
    paste = PasteLesiond(prob=1.0)
    assert paste.collect([donor, free]) == 1
    paste.set_random_state(1)
    out = paste(free)
    lesion = out["label"][0] == 3
    assert int(lesion.sum()) > 0 and len(out["label_cls_indices"][3]) == int(lesion.sum())
    assert torch.allclose(out["image"][0][lesion], torch.tensor(600.0))  # 500 - 800 + 900
