"""Pure fairness functions against hand and numpy recomputation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.report.fairness import bootstrap_ci, site_table, summarize_sites


def test_summary_matches_numpy():
    scores = {"a": 0.91, "b": 0.62, "c": 0.80, "d": 0.55}
    s = summarize_sites(scores, threshold=0.7)
    values = np.array(list(scores.values()))
    assert s.worst_site == "d" and s.best_site == "a"
    assert s.gap == pytest.approx(values.max() - values.min())
    assert s.ratio == pytest.approx(values.min() / values.max())
    assert s.std == pytest.approx(values.std())
    assert s.mean == pytest.approx(values.mean())
    assert s.flagged == ["d", "b"]  # worst first


def test_summary_skips_unscored_sites_and_breaks_ties_by_name():
    s = summarize_sites({"b": 0.8, "a": 0.8, "z": math.nan}, threshold=0.9)
    assert s.worst_site == "a" and s.best_site == "a"
    assert s.gap == 0 and s.unscored == ["z"]
    assert s.flagged == ["a", "b"]


def test_summary_of_nothing_is_nan_not_an_error():
    s = summarize_sites({}, threshold=0.5)
    assert s.worst_site is None and math.isnan(s.gap)


def test_summary_rejects_non_finite_threshold():
    with pytest.raises(ValueError, match="threshold"):
        summarize_sites({"a": 0.5}, threshold=math.nan)


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    values = [0.6, 0.7, 0.8, 0.9, 0.75, math.nan]
    ci = bootstrap_ci(values, n_resamples=1000, seed=3)
    assert ci.n == 5
    assert ci.mean == pytest.approx(np.nanmean(values))
    assert ci.low < ci.mean < ci.high
    assert min(v for v in values if not math.isnan(v)) <= ci.low and ci.high <= 0.9
    assert bootstrap_ci(values, n_resamples=1000, seed=3) == ci
    wider = bootstrap_ci(values, confidence=0.99, n_resamples=1000, seed=3)
    assert wider.high - wider.low >= ci.high - ci.low


@pytest.mark.parametrize("values, n", [([0.7], 1), ([], 0), ([math.nan], 0)])
def test_bootstrap_degenerate_cases(values, n):
    ci = bootstrap_ci(values)
    assert ci.n == n
    if n == 1:
        assert ci.low == ci.mean == ci.high == 0.7
    else:
        assert math.isnan(ci.mean)


@pytest.mark.parametrize("kwargs, match", [({"confidence": 1.0}, "confidence"), ({"n_resamples": 0}, "n_resamples")])
def test_bootstrap_ill_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci([0.5, 0.6], **kwargs)


def test_site_table_means_per_case_first():
    per_case = {"a": [{1: 0.8, 2: 0.6, 3: math.nan}, {1: 0.4, 2: 0.2, 3: 0.9}]}
    row = site_table(per_case, {1: "gm", 2: "wm", 3: "lesion"}, n_resamples=200)[0]
    assert row["n_cases"] == 2
    assert row["dice"][3]["n"] == 1 and row["dice"][3]["mean"] == pytest.approx(0.9)
    assert row["dice"]["mean"]["mean"] == pytest.approx(np.mean([0.7, 0.5]))
    grouped = site_table(per_case, {1: "gm", 2: "wm", 3: "lesion"}, n_resamples=200, groups={"tissue": (1, 2)})[0]
    assert grouped["dice"]["tissue"]["mean"] == pytest.approx(np.mean([0.7, 0.3]))
    assert grouped["dice"]["mean"] == row["dice"]["mean"]
