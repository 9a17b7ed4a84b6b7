"""The harmonization study's hospitals: one factor per site (``fedmri generate --preset study``)."""

from __future__ import annotations

import dataclasses
import json

from server.cli import build_parser
from shared.scanner import ScannerProfile
from shared.synth import DEMO_SITES, SITE_PRESETS, STUDY_SITES, generate_site, site_factor

REFERENCE = ScannerProfile(noise_std=0.01)
FIELDS = ("scale", "shift", "gamma", "bias_strength", "noise_std", "spacing")


def _differences(profile: ScannerProfile) -> set[str]:
    diff = {f for f in FIELDS if getattr(profile, f) != getattr(REFERENCE, f)}
    return {"affine" if f in ("scale", "shift") else f for f in diff}


def test_each_study_site_differs_from_the_reference_in_one_factor():
    sites = {s.name: s for s in STUDY_SITES}
    factors = {name: s.profile.extra["factor"] for name, s in sites.items()}
    assert factors["study-reference"] == "none" and not _differences(sites["study-reference"].profile)
    expected = {"affine": {"affine"}, "gamma": {"gamma"}, "bias field": {"bias_strength"},
                "thick slices": {"spacing"}, "low SNR": {"noise_std"}, "small site": set()}
    for name, spec in sites.items():
        factor = factors[name]
        if factor in expected:
            assert _differences(spec.profile) == expected[factor], name
    assert _differences(sites["study-combined"].profile) == {"gamma", "bias_strength", "noise_std", "spacing"}
    affine = [(s.profile.scale, s.profile.shift) for s in STUDY_SITES if s.profile.extra["factor"] == "affine"]
    assert sorted(affine) == [(0.2, 1000.0), (5.0, -1000.0)]
    assert sites["study-small"].n_train <= 3 < min(s.n_train for s in STUDY_SITES if s.name != "study-small")
    assert min(s.n_test for s in STUDY_SITES) >= 10
    thick = sites["study-thick"].profile.spacing
    assert thick[2] >= 3 * thick[0]


def test_generate_keeps_the_demo_default_and_offers_the_study_preset(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["generate"])
    assert args.preset == "demo" and args.out is None and SITE_PRESETS["demo"] is DEMO_SITES
    assert parser.parse_args(["generate", "--preset", "study"]).preset == "study"
    assert parser.parse_args(["ablation"]).data == "data-study"
    spec = dataclasses.replace(STUDY_SITES[3], n_train=1, n_test=1)  # gamma site, tiny
    site = generate_site(tmp_path, spec, resolution=4)
    assert json.loads((site / "scanner.json").read_text())["extra"] == {"factor": "gamma"}
    assert site_factor(site) == "gamma" and site_factor(tmp_path / "missing") is None
