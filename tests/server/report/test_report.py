"""The report of a real tiny model: numbers recomputed independently, HTML structure, bad sites, CLI."""

from __future__ import annotations

import csv
import json
import math
import shutil
from html.parser import HTMLParser

import nibabel as nib
import numpy as np
import pytest

from server.cli import main
from server.report.build import ReportOptions, generate_report
from server.report.history import read_history

VOID = {"meta", "img", "br", "hr", "input", "link", "col", "source", "wbr", "area", "base", "embed", "param", "track"}


class StructureChecker(HTMLParser):
    """Tag balance, resource references and visible text of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.references: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.references += [v or "" for k, v in attrs if k in ("src", "href", "srcset", "data", "action")]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _numpy_dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    p, t = pred == label, truth == label
    if not t.any():
        return math.nan
    return 2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum())


def test_dice_recomputed_from_saved_predictions(tiny_report, tiny_data_dir):
    report = json.loads(tiny_report.files["json"].read_text())
    folder = tiny_report.files["json"].parent
    assert {s["site"] for s in report["sites"]} == {"site-a", "site-b", "site-c"}
    for site in report["sites"]:
        case_means = []
        for case in site["cases"]:
            pred = np.asarray(nib.load(folder / case["prediction"]).dataobj)
            truth = np.asarray(nib.load(tiny_data_dir / site["site"] / "labelsTs" / f"{case['name']}.nii.gz").dataobj)
            assert pred.shape == truth.shape
            recomputed = {k: _numpy_dice(pred, truth, k) for k in (1, 2, 3)}
            for k, value in recomputed.items():
                stored = case["dice"][str(k)]
                if math.isnan(value):
                    assert stored is None
                else:
                    assert stored == pytest.approx(value, abs=1e-5)
            finite = [v for v in recomputed.values() if not math.isnan(v)]
            case_means.append(np.mean(finite))
        assert site["n_cases"] == len(site["cases"]) == 1
        assert site["dice"]["mean"]["mean"] == pytest.approx(np.mean(case_means), abs=1e-5)


def test_fairness_summary_recomputed_from_the_site_table(tiny_report):
    with tiny_report.files["sites_csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    scores = {r["site"]: float(r["dice_mean"]) for r in rows}
    fairness = json.loads(tiny_report.files["json"].read_text())["fairness"]
    worst, best = min(scores, key=scores.get), max(scores, key=scores.get)
    values = np.array(list(scores.values()))
    assert fairness["worst_site"] == worst and fairness["best_site"] == best
    assert fairness["gap"] == pytest.approx(scores[best] - scores[worst], abs=1e-6)
    assert fairness["ratio"] == pytest.approx(scores[worst] / scores[best], abs=1e-6)
    assert fairness["std"] == pytest.approx(values.std(), abs=1e-6)
    assert sorted(fairness["flagged"]) == sorted(s for s, v in scores.items() if v < 0.4)
    assert {r["site"] for r in rows if r["flagged"] == "True"} == set(fairness["flagged"])
    tissue = {r["site"]: float(r["dice_tissue"]) for r in rows}
    assert tissue == pytest.approx(
        {r["site"]: np.mean([float(r["dice_1"]), float(r["dice_2"])]) for r in rows}, abs=1e-6
    )
    fairness_tissue = json.loads(tiny_report.files["json"].read_text())["fairness_tissue"]
    assert fairness_tissue["worst_site"] == min(tissue, key=tissue.get)
    assert fairness_tissue["gap"] == pytest.approx(max(tissue.values()) - min(tissue.values()), abs=1e-6)


def test_invariance_and_stops_in_the_report(tiny_report):
    inv = json.loads(tiny_report.files["json"].read_text())["invariance"]
    for site, summary in inv["sites"].items():
        checks = inv["checks"][site]["affine"]
        assert summary["n_maps"] == len(checks) == 3
        assert summary["dice_min"] == pytest.approx(min(c["dice"] for c in checks))
        assert summary["dice_min"] >= 0.999  # an instance-norm model
        assert all(0.2 <= c["scale"] <= 5 and -1000 <= c["shift"] <= 1000 for c in checks)
    kinds = {(s["kind"], s["level"]) for s in inv["stops"]}
    assert kinds == {("gamma", 0.5), ("bias", 0.3)}
    # A strong gamma curve is not cancelled: agreement drops below the affine case.
    gamma = next(s for s in inv["stops"] if s["kind"] == "gamma")
    assert gamma["dice_mean"] < inv["dice_mean"]


def test_csv_holds_every_number_of_the_json(tiny_report):
    with tiny_report.files["csv"].open() as fh:
        rows = {r["key"]: r["value"] for r in csv.DictReader(fh)}
    report = json.loads(tiny_report.files["json"].read_text())
    assert float(rows["fairness.gap"]) == pytest.approx(report["fairness"]["gap"])
    assert float(rows["sites.0.dice.mean.low"]) == pytest.approx(report["sites"][0]["dice"]["mean"]["low"])
    assert float(rows["invariance.checks.site-a.affine.2.scale"]) == pytest.approx(
        report["invariance"]["checks"]["site-a"]["affine"][2]["scale"]
    )


def test_html_is_well_formed_self_contained_and_names_every_site(tiny_report):
    text = tiny_report.files["html"].read_text()
    assert text.startswith("<!DOCTYPE html>")
    checker = StructureChecker()
    checker.feed(text)
    checker.close()
    assert not checker.errors and not checker.stack
    assert "script" not in checker.tags and "link" not in checker.tags
    assert checker.references and all(r.startswith("data:image/png;base64,") for r in checker.references)
    assert "http://" not in text and "https://" not in text and "url(" not in text
    visible = " ".join(checker.text)
    for site in ("site-a", "site-b", "site-c"):
        assert site in visible
    for heading in (
        "Invariance certificate",
        "Where instance norm stops",
        "Raw intensities per site",
        "Example slices",
    ):
        assert heading in visible


def test_bad_file_names_the_file_and_skips_the_site(trained_registry, tiny_data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    bad = sorted((data / "site-b" / "imagesTs").glob("*.nii.gz"))[0]
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 3])  # truncated gzip stream
    options = ReportOptions(k=1, gammas=(), bias_strengths=(), n_resamples=100, save_predictions=False, hd95=False)
    result = generate_report(trained_registry, data, tmp_path / "out", options=options)
    assert [s["site"] for s in result.report["sites"]] == ["site-a", "site-c"]
    [skipped] = result.report["skipped"]
    assert skipped["site"] == "site-b" and bad.name in skipped["error"]
    assert bad.name in result.files["html"].read_text()


def test_cli_reports_the_served_model_and_fails_clearly(trained_registry, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "reports"
    args = [
        "report",
        "--data",
        str(tiny_data_dir),
        "--registry",
        str(trained_registry),
        "--out",
        str(out),
        "--k",
        "1",
        "--no-stops",
        "--bootstrap",
        "100",
        "--no-predictions",
    ]
    assert main(args) == 0
    assert (out / "tiny-instance" / "report.html").is_file()  # the served version
    assert not (out / "tiny-instance" / "predictions").exists()
    assert "worst site" in capsys.readouterr().out
    assert main(args[:-1] + ["--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_history_from_a_federation_run_log(tmp_path):
    from shared.runlog import RunLog

    log = RunLog(tmp_path / "run.jsonl")
    log.write("start", run_name="x", sites=["a", "b"])
    log.write("round", round=1, missing=["b"], sites={"a": {"train": {"train_loss": 1.0}, "eval": {"dice_mean": 0.4}}})
    log.write(
        "round",
        round=2,
        missing=[],
        sites={"a": {"eval": {"dice_mean": 0.6}}, "b": {"eval": {"dice_mean": float("nan")}}},
    )
    log.write("end", status="completed")
    history = read_history(log.path)
    assert history.rounds == [1, 2]
    assert history.sites["a"] == [0.4, 0.6]
    assert math.isnan(history.sites["b"][0]) and math.isnan(history.sites["b"][1])
    assert history.missing == [["b"], []]
    with pytest.raises(FileNotFoundError):
        read_history(tmp_path / "missing.jsonl")


def test_the_report_shows_the_sites_ood_summaries_and_threshold(trained_registry, tiny_data_dir, tmp_path):
    from server.report.build import ReportOptions, generate_report
    from shared.ood import build_record, site_reference_from_dir, write_ood

    registry = tmp_path / "registry"
    shutil.copytree(trained_registry, registry)
    sites = ("site-a", "site-b", "site-c")
    refs = {s: site_reference_from_dir(tiny_data_dir / s, gammas=(0.5,), bias_strengths=(0.5,)) for s in sites}
    write_ood(registry, "tiny-instance", build_record(refs))
    options = ReportOptions(k=0, gammas=(), bias_strengths=(), n_resamples=100, hd95=False, save_predictions=False)
    result = generate_report(registry, tiny_data_dir, tmp_path / "report", options=options)
    ood = result.report["ood"]
    assert sorted(ood["sites"]) == list(sites) and all(v["n"] >= 1 for v in ood["sites"].values())
    assert ood["threshold"] > 0 and {(s["kind"], s["level"]) for s in ood["stops"]} == {("gamma", 0.5), ("bias", 0.5)}
    page = result.files["html"].read_text()
    assert "Out-of-distribution check of uploads" in page and "training volumes summarised" in page
