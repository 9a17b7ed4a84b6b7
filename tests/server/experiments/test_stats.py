"""The ablation's statistics: seed spread, paired bootstrap CIs and the sentences generated from them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.experiments.ablation import analyse
from server.experiments.stats import claim, mean_sd, paired_difference


def test_mean_sd_over_seeds():
    assert mean_sd([0.5, 0.7, 0.6]) == pytest.approx({"mean": 0.6, "sd": 0.1, "n": 3})
    one = mean_sd([0.5, math.nan])
    assert one["n"] == 1 and math.isnan(one["sd"])


def test_paired_ci_excludes_zero_only_for_a_consistent_difference():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.5, 0.9, 12)
    clear = paired_difference(b + 0.05 + rng.normal(0, 0.005, 12), b)
    assert clear["n"] == 12 and clear["low"] > 0 and clear["low"] < clear["diff"] < clear["high"]
    noisy = paired_difference(b + rng.normal(0, 0.05, 12), b)
    assert noisy["low"] < 0 < noisy["high"]
    assert paired_difference([1.0, math.nan], [0.5, 0.5])["n"] == 1
    with pytest.raises(ValueError, match="length"):
        paired_difference([1.0], [1.0, 2.0])


def test_claims_say_better_only_where_the_ci_excludes_zero():
    better = claim("A", "B", "site-x", {"diff": 0.05, "low": 0.01, "high": 0.09, "n": 12})
    worse = claim("A", "B", "site-x", {"diff": -0.05, "low": -0.09, "high": -0.01, "n": 12})
    none = claim("A", "B", "site-x", {"diff": 0.003, "low": -0.01, "high": 0.02, "n": 12})
    assert "A is better than B" in better and "+0.050" in better and "n=12" in better
    assert "A is worse than B" in worse
    assert "no detectable difference between A and B" in none and "better" not in none


def _seed_scores(offset: float, cases: int = 10) -> dict:
    rng = np.random.default_rng(int(abs(offset) * 1000))
    out = {}
    for site, base in (("s-ref", 0.8), ("s-gamma", 0.6)):
        dice = {f"c{i}": base + offset + rng.normal(0, 0.01) for i in range(cases)}
        out[site] = {"dice": float(np.mean(list(dice.values()))), "tissue_dice": 0.5, "dice_per_label": {"1": 0.5},
                     "n_cases": cases, "cases": dice, "invariance_mean": 1.0, "invariance_min": 1.0}
    return out


def test_analyse_generates_claims_seed_spread_and_factor_costs():
    rows = []
    for name, title, offset in (("fed-in", "federated IN (FedAvg)", 0.0), ("fed-bn", "federated BN (FedAvg)", -0.1),
                                ("pooled-in", "pooled centralized IN", 0.0)):
        rows.append({"name": name, "title": title, "kind": "federated", "evaluation": "global", "sites": {},
                     "seeds": {"0": _seed_scores(offset), "1": _seed_scores(offset + 0.001)}})
    results = {"config": {"seeds": [0, 1], "threshold": 0.7, "bootstrap": 1000}, "variants": rows,
               "site_factors": {"s-ref": "none", "s-gamma": "gamma"}}
    out = analyse(results)
    fed_in = out["variants"][0]
    assert fed_in["sites"]["s-ref"]["n_cases"] == 10 and fed_in["sites"]["s-ref"]["n_seeds"] == 2
    assert fed_in["sites"]["s-ref"]["sd"] > 0
    vs_bn = out["comparisons"]["s-gamma"]["IN − BN"]
    assert vs_bn["low"] > 0 and vs_bn["n"] == 10
    text = " ".join(out["claims"])
    assert "s-gamma: federated IN is better than federated BN (FedAvg)" in text
    assert "no detectable difference between federated IN and pooled centralized IN" in text
    assert len(out["claims"]) == 4  # 2 sites x (BN, pooled); no local-only row here
    cost = out["factors"]["costs"]["fed-in"]["s-gamma"]
    assert cost["factor"] == "gamma" and cost["mean"] == pytest.approx(0.2, abs=0.02)


def test_seeds_run_apart_merge_into_one_study_and_the_readme_block_is_regenerated(tmp_path):
    from server.experiments.ablation import merge_results
    from server.report.ablation import README_BEGIN, README_END, render_ablation_markdown, update_readme

    def part(seed: int) -> dict:
        rows = [{"name": n, "title": t, "kind": "federated", "evaluation": "global", "sites": {},
                 "seeds": {str(seed): _seed_scores(o + seed / 1000)}}
                for n, t, o in (("fed-in", "federated IN (FedAvg)", 0.0), ("fed-bn", "federated BN (FedAvg)", -0.1))]
        return {"config": {"seeds": [seed], "threshold": 0.7, "bootstrap": 500, "k": 1,
                           "run": {"num-server-rounds": 1, "local-epochs": 1, "spacing": "4,4,4",
                                   "roi-size": "32,32,32", "channels": "8,16", "lr": 0.003, "seed": seed}},
                "variants": rows, "site_factors": {"s-ref": "none", "s-gamma": "gamma"}, "timings": [], "seconds": 60.0,
                "budget_epochs": 1, "data_dir": "d"}

    merged = merge_results([part(0), part(1), part(2)])
    assert merged["config"]["seeds"] == [0, 1, 2]
    assert merged["variants"][0]["sites"]["s-ref"]["n_seeds"] == 3
    md = render_ablation_markdown(merged)
    assert "mean ± sd over 3 seed(s)" in md and "federated IN is better than federated BN" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nOLD-NUMBERS\n{README_END}\noutro\n")
    assert update_readme(readme, md)
    text = readme.read_text()
    assert "OLD-NUMBERS" not in text and md.strip() in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert update_readme(readme, md) and readme.read_text() == text  # idempotent
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not update_readme(plain, md)
