"""`fedmri ablation` end to end on the tiny sites: real Flower simulation, real training, real report.

One federated variant only: each Flower simulation costs ~40-60 s of start-up on 2 cores.
"""

from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest

from server.cli import main
from server.experiments.ablation import VARIANTS, AblationConfig
from server.report.ablation import README_BEGIN, README_END
from server.report.build import ReportOptions, generate_report


@pytest.mark.slow
def test_ablation_end_to_end(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "ablation"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_BEGIN}\nold numbers\n{README_END}\n\nrest\n")
    args = [
        "ablation",
        "--data",
        str(tiny_data_dir),
        "--out",
        str(out),
        "--variants",
        "fed-in,pooled-in,local-in",
        "--rounds",
        "1",
        "--local-epochs",
        "2",
        "--spacing",
        "4,4,4",
        "--roi",
        "32,32,32",
        "--channels",
        "8,16,32",
        "--k",
        "2",
        "--threshold",
        "0.3",
        "--seeds",
        "0,1",
        "--publish",
        str(tmp_path / "published"),
        "--readme",
        str(readme),
    ]
    assert main(args) == 0
    assert "ablation.html" in capsys.readouterr().out

    results = json.loads((out / "ablation.json").read_text())
    variants = {v["name"]: v for v in results["variants"]}
    assert list(variants) == ["fed-in", "pooled-in", "local-in"]
    assert results["budget_epochs"] == 2
    sites = ["site-a", "site-b", "site-c"]
    for name in ("fed-in", "pooled-in"):
        v = variants[name]
        assert sorted(v["sites"]) == sites
        scores = {s: v["sites"][s]["dice"] for s in sites}
        # The summary is recomputed from the per-site table.
        assert v["worst_site"] == min(scores, key=scores.get)
        assert v["gap"] == pytest.approx(max(scores.values()) - min(scores.values()))
        assert v["mean_dice"] == pytest.approx(np.mean(list(scores.values())))
        assert v["flagged"] == sorted((s for s in sites if scores[s] < 0.3), key=lambda s: (scores[s], s))
    # Instance-norm models are invariant to scanner affine maps (IN vs BN: test_invariance.py).
    assert variants["fed-in"]["invariance_min"] >= 0.999 and variants["pooled-in"]["invariance_min"] >= 0.999
    assert variants["fed-in"]["sites"]["site-a"]["n_cases"] == 1
    assert variants["fed-in"]["version"].startswith("ablation-fed-in-s0")
    assert variants["fed-in"]["history"]["rounds"] == [1]
    assert sorted(variants["fed-in"]["fed_val_last_round"]) == sites

    # Cross-site matrix: one local model per site, evaluated on every site; the diagonal is the local row.
    matrix = results["cross_site"]
    assert sorted(matrix) == sites and all(sorted(row) == sites for row in matrix.values())
    for s in sites:
        assert variants["local-in"]["seeds"]["0"][s]["dice"] == pytest.approx(matrix[s][s])
    # Seeds: each row holds every seed's per-case Dice; the site value is the mean over seeds.
    for s in sites:
        per_seed = [variants["fed-in"]["seeds"][k][s]["dice"] for k in ("0", "1")]
        assert variants["fed-in"]["sites"][s]["dice"] == pytest.approx(np.mean(per_seed))
        assert variants["fed-in"]["sites"][s]["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    assert results["cross_site_federated"] == {s: variants["fed-in"]["seeds"]["0"][s]["dice"] for s in sites}
    # Paired comparisons at every site, and one generated sentence per (site, comparison).
    assert sorted(results["comparisons"]) == sites
    assert set(results["comparisons"]["site-a"]) == {"IN − pooled", "IN − local-only"}
    assert len(results["claims"]) == 6 and all("federated IN" in c for c in results["claims"])
    for c in results["claims"]:
        assert ("better" in c or "worse" in c) != ("no detectable difference" in c)

    with (out / "ablation.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    fed_in_b = next(r for r in rows if r["variant"] == "fed-in" and r["site"] == "site-b" and r["seed"] == "1")
    assert float(fed_in_b["dice"]) == pytest.approx(variants["fed-in"]["seeds"]["1"]["site-b"]["dice"])
    assert len([r for r in rows if r["variant"].startswith("local-in[")]) == 9

    page = (out / "ablation.html").read_text()
    refs = []

    class Refs(HTMLParser):
        def handle_starttag(self, tag, attrs):
            refs.extend(v for k, v in attrs if k in ("src", "href"))

    Refs().feed(page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    for title in ("federated IN (FedAvg)", "pooled centralized IN", "local-only IN", *sites):
        assert title in page
    md = (out / "ablation.md").read_text()
    assert "| federated IN (FedAvg) |" in md and "trained on" in md and "95% CI" in md
    published = (tmp_path / "published" / "ablation.md").read_text()
    assert published == md and (tmp_path / "published" / "ablation.json").is_file()
    text = readme.read_text()
    assert "old numbers" not in text and md.strip() in text and text.endswith("rest\n")

    # The fairness report of the federated model finds its run log and plots the rounds.
    report = generate_report(
        out / "runs" / "registry",
        tiny_data_dir,
        tmp_path / "report",
        version=variants["fed-in"]["version"],
        options=ReportOptions(k=1, gammas=(), bias_strengths=(), n_resamples=100, hd95=False),
    ).report
    assert report["history"]["rounds"] == [1]
    assert report["history"]["sites"] == {s: [variants["fed-in"]["fed_val_last_round"][s]] for s in sites}
    assert report["model"]["kind"] == "federated"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variants": ("fed-xx",)}, "unknown ablation variant"),
        ({"run_config": {"num-server-rounds": 0}}, "'num-server-rounds'"),
        ({"run_config": {"roi": "48,48,48"}}, "unknown run config key"),
    ],
)
def test_ablation_config_ill_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AblationConfig.preset(**kwargs)


def test_full_preset_is_bigger_than_the_fast_default_and_flags_override_it():
    fast, full = AblationConfig.preset(), AblationConfig.preset(full=True, run_config={"num-server-rounds": 3})
    assert full.run.num_server_rounds == 3 and full.k > fast.k
    assert math.prod(full.run.roi_size) > math.prod(fast.run.roi_size) and full.run.spacing < fast.run.spacing


def test_variants_are_run_config_overrides_of_one_base():
    config = AblationConfig.preset(run_config={"channels": "4,8", "lr": 0.01})
    fedbn = config.variant_config(VARIANTS["fedbn"])
    assert fedbn.norm == "batch" and fedbn.fedbn and fedbn.channels == (4, 8) and fedbn.lr == 0.01
    assert config.variant_config(VARIANTS["fed-in"]).replace(norm="batch", fedbn=True) == fedbn
    assert config.to_dict()["run"]["channels"] == "4,8"
