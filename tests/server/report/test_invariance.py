"""The invariance certificate: its building blocks, and IN against BN on the same data."""

from __future__ import annotations

import numpy as np
import pytest

from server.report.evaluation import evaluate_sites
from server.report.invariance import (
    AffineMap,
    agreement_dice,
    perturb_bias,
    perturb_gamma,
    random_affine_maps,
    summarize_checks,
)
from shared.registry import data_config_from_meta, load_model
from shared.scanner import smooth_bias_field


def test_random_maps_stay_in_range_and_are_seeded():
    maps = random_affine_maps(200, np.random.default_rng(1))
    scales, shifts = np.array([m.scale for m in maps]), np.array([m.shift for m in maps])
    assert scales.min() >= 0.2 and scales.max() <= 5.0 and shifts.min() >= -1000 and shifts.max() <= 1000
    assert (scales < 1).any() and (scales > 1).any() and (shifts < 0).any() and (shifts > 0).any()
    assert maps == random_affine_maps(200, np.random.default_rng(1))
    assert AffineMap(2.0, -5.0)(np.array([1.0, 3.0])).tolist() == [-3.0, 1.0]


@pytest.mark.parametrize("kwargs, match", [({"k": 0}, "k must"), ({"k": 2, "scale_range": (0.0, 1.0)}, "scale_range")])
def test_random_maps_ill_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        random_affine_maps(rng=np.random.default_rng(0), **kwargs)


def test_agreement_dice_counts_one_sided_labels():
    a = np.array([0, 1, 1, 2, 2, 0])
    assert agreement_dice(a, a) == 1.0
    assert agreement_dice(np.zeros(4), np.zeros(4)) == 1.0
    b = np.array([0, 1, 0, 2, 2, 3])  # label 1: 2*1/3, label 2: 1, label 3 only in b: 0
    assert agreement_dice(a, b) == pytest.approx(np.mean([2 / 3, 1.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        agreement_dice(a, a[:3])


def test_gamma_and_bias_use_the_scanner_model_in_the_volume_range():
    rng = np.random.default_rng(0)
    volume = (rng.uniform(0, 1, size=(12, 12, 12)) * 4000 - 300).astype(np.float32)
    lo, hi = volume.min(), volume.max()
    g = perturb_gamma(volume, 0.5)
    assert g.min() == pytest.approx(lo, abs=1e-2) and g.max() == pytest.approx(hi, abs=1e-1)
    expected = lo + ((volume - lo) / (hi - lo)) ** 0.5 * (hi - lo)
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=0.05)
    np.testing.assert_allclose(perturb_gamma(volume, 1.0), volume, atol=0.05)
    b = perturb_bias(volume, 0.3, np.random.default_rng(7))
    field = smooth_bias_field(volume.shape, 0.3, np.random.default_rng(7))
    np.testing.assert_allclose(b, lo + (volume - lo) * field, rtol=1e-4, atol=0.05)


def test_summarize_checks():
    assert summarize_checks([{"dice": 0.5}, {"dice": 1.0}]) == {"min": 0.5, "mean": 0.75, "n": 2}
    assert summarize_checks([])["n"] == 0


def test_instance_norm_is_invariant_and_batch_norm_is_not(trained_registry, tiny_data_dir):
    """Same data, epochs and seed; only the norm differs. BN in eval mode uses running stats."""
    scores = {}
    for version in ("tiny-instance", "tiny-batch"):
        model, meta = load_model(trained_registry, version)
        assert not model.training
        evaluations, skipped = evaluate_sites(
            model, tiny_data_dir, data_config_from_meta(meta), k=3, gammas=(), bias_strengths=(), hd95=False
        )
        assert not skipped
        scores[version] = summarize_checks([c for e in evaluations for c in e.affine_checks])
        assert scores[version]["n"] == 3 * sum(len(e.cases) for e in evaluations)
    assert scores["tiny-instance"]["min"] >= 0.999
    assert scores["tiny-instance"]["mean"] > scores["tiny-batch"]["mean"]
    assert scores["tiny-batch"]["min"] < 0.99
