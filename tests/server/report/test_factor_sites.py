"""The fairness report's "where instance norm stops" gains the study's one-factor sites."""

from __future__ import annotations

import json

import pytest

from server.report.assemble import factor_sites
from server.report.render import _stops_section


def test_factor_sites_cost_against_the_reference_scanner(tmp_path):
    for site, factor in (("ref", "none"), ("gam", "gamma"), ("plain", None)):
        (tmp_path / site).mkdir()
        if factor:
            (tmp_path / site / "scanner.json").write_text(json.dumps({"scale": 1.0, "extra": {"factor": factor}}))
    rows = [{"site": s, "dice": {"mean": {"mean": m}, "tissue": {"mean": t}}}
            for s, m, t in (("ref", 0.8, 0.9), ("gam", 0.6, 0.75), ("plain", 0.5, 0.5))]
    out = factor_sites(rows, tmp_path)
    assert [f["site"] for f in out] == ["gam"]
    assert out[0]["factor"] == "gamma" and out[0]["reference"] == "ref"
    assert out[0]["dice_cost"] == pytest.approx(0.2) and out[0]["tissue_cost"] == pytest.approx(0.15)
    assert factor_sites(rows, "") == [] and factor_sites(rows[1:], tmp_path) == []  # no reference site: no table

    report = {"invariance": {"stops": [], "sites": {}, "factor_sites": out}}
    assert "Skipped" in _stops_section(report, {})  # no stop levels: the section is skipped as before
    report["invariance"].update(stops=[{"kind": "gamma", "level": 0.5, "dice_mean": 0.9, "dice_min": 0.8,
                                        "sites": {"gam": {"dice_mean": 0.9}}}],
                                sites={"gam": {"dice_mean": 1.0}}, dice_mean=1.0, dice_min=1.0)
    html = _stops_section(report, {})
    assert "one-factor sites" in html and "gamma" in html and "0.200" in html
