"""bench/run.py: the summary from the per-benchmark files, and the README block generated from it."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_results(out: Path) -> None:
    model = {"forward_over_floor": 1.8, "monai_over_floor": 2.5, "overlap_share": 0.3, "best_same_prediction": "fp32"}
    (out / "inference.json").write_text(json.dumps({
        "models": [{"model": "large_1mm", **model}, {"model": "demo", **model, "forward_over_floor": 3.1}],
        "dense_conv_gflops": 120.0,
        "invariance_label_agreement": {"fp32": [1.0, 1.0]},
    }))
    (out / "api.json").write_text(json.dumps({"configs": [{
        "config": "default", "ratio_rest_vs_inprocess_pipeline": 1.05, "ratio_fixed_vs_read": 2.4,
        "ratio_rest_vs_monai_bundle": 0.5, "median_seconds": {"rest": 0.5},
    }]}))
    (out / "federation.json").write_text(json.dumps({
        "overhead": {"ratio": 0.93},
        "scaling": [{"n_sites": 3, "peak_rss_mb": 2600, "round_s": [19.0, 1.5]},
                    {"n_sites": 100, "peak_rss_mb": 6144, "round_s": [60.0, 20.0]}],
    }))


def test_summary_holds_every_figure_and_says_which_goals_are_met(run, tmp_path):
    write_results(tmp_path)
    (tmp_path / "soak.json").write_text(json.dumps({"soak_p95_s": 0.9}))
    summary = run.summarize(tmp_path, records={}, results=tmp_path)
    for key in ("forward_over_floor_1mm", "forward_over_floor_demo", "rest_over_pipeline_1mm", "fixed_over_read_1mm",
                "rest_over_monai_pipeline", "round_over_bare", "sim_sites_max", "sim_peak_rss_gib_at_max",
                "soak_p95_s", "native_round_over_sim"):
        assert key in summary
    assert summary["forward_over_floor_1mm"] == 1.8 and summary["goals"]["forward_over_floor_1mm"]["met"] is True
    assert summary["goals"]["fixed_over_read_1mm"]["met"] is False  # 2.4 > 2
    assert summary["sim_sites_max"] == 100 and summary["sim_peak_rss_gib_at_max"] == 6.0
    assert summary["soak_p95_s"] == 0.9
    assert summary["native_round_over_sim"] is None and summary["goals"]["native_round_over_sim"]["met"] is None
    (tmp_path / "compose.json").write_text(json.dumps({"compose_round_over_sim": 1.7}))
    (tmp_path / "native.json").write_text(json.dumps({"native_round_over_sim": 1.3}))
    both = run.summarize(tmp_path, records={}, results=tmp_path)["goals"]
    assert (both["native_round_over_sim"]["met"], both["compose_round_over_sim"]["met"]) == (True, False)
    assert summary["details"]["sim_steady_round_s_by_sites"] == {"3": 1.5, "100": 20.0}


def test_missing_benchmarks_are_not_measured_never_invented(run, tmp_path):
    summary = run.summarize(tmp_path, records={}, results=tmp_path)
    assert all(summary[k] is None for k in run.GOALS)
    assert "not measured" in run.readme_block(summary)


def test_readme_block_is_rewritten_between_markers_only(run, tmp_path):
    write_results(tmp_path)
    summary = run.summarize(tmp_path, records={"api": {"load_average_before": [3.0], "load_average_after": [2.0]}},
                            results=tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{run.START}\nold table\n{run.END}\nafter\n")
    assert run.update_readme(summary, readme)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith("\nafter\n")
    assert "old table" not in text and "| `fixed_over_read_1mm` | 2.4 | <= 2 | **missed** |" in text
    assert "api 3.0->2.0" in text and "earlier invocation" not in text
    assert run.update_readme(summary, readme) and readme.read_text() == text  # idempotent
    summary["steps"]["inference"] = {"load_average_before": [1.0], "load_average_after": [1.5],
                                      "from_earlier_invocation": True}
    assert "inference from an earlier invocation" in run.readme_block(summary)  # `--only api` said so
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not run.update_readme(summary, plain) and plain.read_text() == "no markers\n"


def test_quick_steps_are_smaller(run, tmp_path):
    quick, full = run.steps(True, tmp_path), run.steps(False, tmp_path)
    assert set(quick) == {"inference", "api", "federation", "soak"} and set(full) == set(quick) | {"native"}
    assert "3,10" in quick["federation"] and "3,10,30,100" in full["federation"]
    assert "--quick" in quick["inference"] and "--quick" not in full["inference"]
    assert "--requests" in quick["soak"] and "--requests" not in full["soak"]
    assert full["native"][full["native"].index("--out") + 1] == str(tmp_path / "native")


def test_figures_not_measured_by_this_invocation_are_dated(run, tmp_path):
    results, quick = tmp_path, tmp_path / "quick"
    quick.mkdir()
    write_results(quick)
    (quick / "soak.json").write_text(json.dumps({"soak_p95_s": 0.4, "date": "now"}))
    (results / "soak.json").write_text(json.dumps({"soak_p95_s": 0.9, "date": "2026-01-01 00:00 UTC"}))
    (results / "native.json").write_text(json.dumps({"native_round_over_sim": 1.2, "when": "2026-01-02 00:00 UTC"}))
    (results / "compose.json").write_text(json.dumps({"compose_round_over_sim": 1.4, "when": "2026-01-03 00:00 UTC"}))
    summary = run.summarize(quick, records={}, quick=True, results=results)
    assert summary["soak_p95_s"] == 0.4 and "soak_measured" not in summary["details"]  # this run's, not the older
    assert (summary["native_round_over_sim"], summary["compose_round_over_sim"]) == (1.2, 1.4)
    line = run.readme_block(summary).splitlines()[1]
    assert "native at 2026-01-02 00:00 UTC, compose at 2026-01-03 00:00 UTC" in line and "soak at" not in line


def test_round_over_bare_is_the_demo_work_where_it_was_measured(run, tmp_path):
    write_results(tmp_path)
    tiny_only = run.summarize(tmp_path, records={}, results=tmp_path)
    assert tiny_only["round_over_bare"] == 0.93 and tiny_only["details"]["round_over_bare_tiny"] == 0.93
    (tmp_path / "federation.json").write_text(json.dumps({
        "overhead": {"ratio": 1.3, "overhead_per_round_s": 0.3},
        "overhead_demo": {"ratio": 1.02, "overhead_per_round_s": 0.4},
        "scaling": [],
    }))
    summary = run.summarize(tmp_path, records={}, results=tmp_path)
    assert summary["round_over_bare"] == 1.02 and summary["goals"]["round_over_bare"]["met"] is True
    assert summary["details"]["round_over_bare_tiny"] == 1.3
    assert summary["details"]["flower_overhead_per_round_s_tiny"] == 0.3
    assert summary["details"]["flower_overhead_per_round_s_demo"] == 0.4
