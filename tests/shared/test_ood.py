"""shared.ood: the affine-invariant intensity summary, site aggregates, the score and its threshold."""

from __future__ import annotations

import numpy as np
import pytest

from shared.data import find_cases
from shared.io import load_volume
from shared.ood import (
    FEATURES,
    THRESHOLD,
    _in_signal_range,
    assess,
    build_record,
    expected_tissue_dice,
    intensity_summary,
    read_ood,
    site_from_metrics,
    site_metrics,
    site_reference_from_dir,
    write_ood,
)
from shared.scanner import ScannerProfile


@pytest.fixture(scope="module")
def record(tiny_data_dir):
    """What the federation stores: each tiny site's reference from its own training volumes."""
    sites = {p.name: site_reference_from_dir(p) for p in sorted(tiny_data_dir.iterdir()) if p.is_dir()}
    return build_record(sites)


@pytest.fixture(scope="module")
def test_scans(tiny_data_dir):
    return {
        p.name: load_volume(find_cases(p, "test")[0]["image"])[0] for p in sorted(tiny_data_dir.iterdir()) if p.is_dir()
    }


@pytest.mark.parametrize("s, b", [(1.0, 0.0), (4.0, -300.0), (0.25, 500.0), (0.01, -3.0), (50.0, 1e4)])
def test_summary_is_invariant_to_scanner_affines(test_scans, s, b):
    x = test_scans["site-a"].astype(np.float64)
    np.testing.assert_allclose(intensity_summary(s * x + b), intensity_summary(x), atol=1e-6)
    assert intensity_summary(x).shape == (len(FEATURES),)


@pytest.mark.parametrize("s, b", [(1.0, 0.0), (3.0, -800.0), (0.2, 1000.0), (0.05, 7.0)])
def test_held_out_scans_from_training_scanners_get_no_warning(record, test_scans, s, b):
    for site, x in test_scans.items():
        ood = assess(s * x.astype(np.float64) + b, record)
        assert not ood["warning"], (site, ood)
        assert ood["score"] == pytest.approx(assess(x, record)["score"], abs=1e-4)  # the same score, whatever s and b
        assert ood["threshold"] == THRESHOLD


@pytest.mark.parametrize("kind, level", [("gamma", 0.3), ("gamma", 0.35), ("bias", 0.7), ("bias", 0.9)])
def test_strong_gamma_or_bias_field_gets_a_warning(record, test_scans, kind, level):
    """A bias field's effect depends on its random shape: seed 0 draws one that varies across the brain.

    (Over 8 random fields of amplitude 0.7, 14 of 24 scans are flagged; see shared/ood.py.)
    """
    profile = ScannerProfile(gamma=level) if kind == "gamma" else ScannerProfile(bias_strength=level)
    for site, x in test_scans.items():
        ood = assess(4.0 * _in_signal_range(x, profile, np.random.default_rng(0)) - 300.0, record)
        assert ood["warning"], (site, ood)
        assert ood["score"] > THRESHOLD


def test_scores_grow_with_the_stop_levels(record):
    gamma = [s["score"] for s in record["stops"] if s["kind"] == "gamma"]  # levels 0.85, 0.7, 0.5, 0.35
    assert gamma == sorted(gamma) and gamma[-1] > THRESHOLD > gamma[0]


def test_site_reference_travels_as_flower_metrics_and_back(tiny_data_dir):
    from flwr.app import MetricRecord

    reference = site_reference_from_dir(tiny_data_dir / "site-b")
    metrics = site_metrics(reference)
    MetricRecord(metrics)  # only numbers and lists of numbers
    back = site_from_metrics(dict(MetricRecord(metrics)))
    assert back["n"] == reference["n"] == 3
    np.testing.assert_allclose(back["mean"], reference["mean"])
    assert [(s["kind"], s["level"]) for s in back["stops"]] == [(s["kind"], s["level"]) for s in reference["stops"]]
    assert site_from_metrics({"train_loss": 0.3}) is None


def test_registry_round_trip(tmp_path, record):
    (tmp_path / "v1").mkdir()
    write_ood(tmp_path, "v1", record)
    assert read_ood(tmp_path, "v1") == record
    assert read_ood(tmp_path, "v2") is None
    with pytest.raises(FileNotFoundError):
        write_ood(tmp_path, "missing", record)


def test_expected_tissue_dice_reads_the_reports_stop_table(record):
    levels = {(s["kind"], s["level"]): s["score"] for s in record["stops"]}
    report = {
        "sites": [{"site": "site-a", "dice": {"tissue": {"mean": 0.8}}}],
        "invariance": {
            "stops": [{"kind": k, "level": lv, "dice_mean": 1.0 - 0.1 * i} for i, (k, lv) in enumerate(levels)]
        },
    }
    assert expected_tissue_dice(0.0, "site-a", record, report) == pytest.approx(0.8)
    at_gamma_05 = levels[("gamma", 0.5)]
    assert expected_tissue_dice(at_gamma_05, "site-a", record, report) <= 0.8 * 0.8 + 1e-9
    assert expected_tissue_dice(1e6, "site-a", record, report) == pytest.approx(0.8 * 0.3)  # flat past the last level
    assert expected_tissue_dice(0.5, "site-a", record, None) is None
