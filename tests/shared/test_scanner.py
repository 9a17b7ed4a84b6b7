import numpy as np
import pytest

from shared.scanner import REFERENCE_RANGE, ScannerProfile, apply_scanner, smooth_bias_field


@pytest.fixture
def signal():
    return np.random.default_rng(0).uniform(0, REFERENCE_RANGE, size=(20, 22, 18)).astype(np.float32)


@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (0.25, -500.0), (4.0, 300.0), (0.01, -3.0)])
def test_affine_only_is_exactly_s_x_plus_b(signal, scale, shift):
    out = apply_scanner(signal, ScannerProfile(scale=scale, shift=shift))
    expected = (scale * signal.astype(np.float64) + shift).astype(np.float32)
    np.testing.assert_array_equal(out, expected)


def test_gamma_is_applied_before_the_affine(signal):
    out = apply_scanner(signal, ScannerProfile(scale=2.0, shift=10.0, gamma=0.5))
    expected = 2.0 * REFERENCE_RANGE * (signal.astype(np.float64) / REFERENCE_RANGE) ** 0.5 + 10.0
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_bias_field_is_smooth_and_bounded(signal):
    rng = np.random.default_rng(1)
    out = apply_scanner(signal, ScannerProfile(bias_strength=0.3), rng)
    ratio = out / signal
    assert 0.69 <= ratio.min() and ratio.max() <= 1.31
    assert ratio.max() - ratio.min() > 0.2, "field should actually vary"
    field = smooth_bias_field((32, 32, 32), 0.3, np.random.default_rng(2))
    # Smooth: neighbouring voxels differ far less than the field's range.
    assert np.abs(np.diff(field, axis=0)).max() < 0.1 * (field.max() - field.min())


@pytest.mark.parametrize("noise", ["gaussian", "rician"])
def test_noise_has_the_configured_strength(noise):
    flat = np.full((40, 40, 40), 500.0, dtype=np.float32)
    out = apply_scanner(flat, ScannerProfile(noise_std=0.02, noise=noise), np.random.default_rng(3))
    assert out.std() == pytest.approx(0.02 * REFERENCE_RANGE, rel=0.1)


def test_same_rng_seed_same_output(signal):
    profile = ScannerProfile(scale=3, shift=1, gamma=0.8, bias_strength=0.2, noise_std=0.01)
    a = apply_scanner(signal, profile, np.random.default_rng(7))
    b = apply_scanner(signal, profile, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"scale": 0}, "scale"),
        ({"scale": -1}, "scale"),
        ({"gamma": 0}, "gamma"),
        ({"bias_strength": 1.5}, "bias_strength"),
        ({"noise": "poisson"}, "noise"),
        ({"spacing": (1, 1)}, "spacing"),
        ({"noise_std": -1}, "noise_std"),
    ],
)
def test_ill_profiles_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScannerProfile(**kwargs)


def test_rng_required_for_random_effects(signal):
    with pytest.raises(ValueError, match="rng"):
        apply_scanner(signal, ScannerProfile(noise_std=0.1))


def test_profile_json_round_trip(tmp_path):
    p = ScannerProfile(scale=2, shift=-3, gamma=0.7, spacing=(1, 1, 2))
    p.to_json(tmp_path / "s.json")
    assert ScannerProfile.from_json(tmp_path / "s.json") == p
