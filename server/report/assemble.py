"""Assemble the per-site fairness report of one model from its evaluations: numbers and figures, no HTML."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from server.report import figures
from server.report.evaluation import SiteEvaluation
from server.report.fairness import site_table, summarize_sites
from server.report.history import RoundHistory
from server.report.invariance import (
    DEFAULT_BIAS_STRENGTHS,
    DEFAULT_GAMMAS,
    SCALE_RANGE,
    SHIFT_RANGE,
    summarize_checks,
)
from shared.labels import FOREGROUND_LABELS, LABELS, TISSUE_LABELS
from shared.metrics import nanmean

__all__ = ["ReportOptions", "assemble_report", "model_info", "ood_summary"]

FOREGROUND = {k: LABELS[k] for k in FOREGROUND_LABELS}
# Grey and white matter occur in every case; lesions in some. A site's all-label mean therefore
# also reflects how many of its cases have a lesion, so fairness is summarised on both.


@dataclass
class ReportOptions:
    """What the report measures.

    Args:
        k: random affine maps per test volume for the invariance certificate (0 skips it).
        threshold: sites whose mean Dice is below it are flagged.
        gammas, bias_strengths: "where IN stops" levels (empty skips that check).
        seed: seeds the affine maps, bias fields and bootstrap.
        n_resamples: bootstrap resamples for the 95% intervals.
        hd95: compute HD95 (mm).
        sites: site folder names to evaluate (default: all under the data folder).
        save_predictions: write predicted label maps next to the report.
        run_log: federation run log (JSONL) for the per-round history; found from the
            model's metadata when not given.
    """

    k: int = 5
    threshold: float = 0.7
    gammas: tuple[float, ...] = DEFAULT_GAMMAS
    bias_strengths: tuple[float, ...] = DEFAULT_BIAS_STRENGTHS
    seed: int = 0
    n_resamples: int = 2000
    hd95: bool = True
    sites: list[str] | None = None
    save_predictions: bool = True
    run_log: str | None = None

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be a Dice value in [0, 1], got {self.threshold}")
        self.gammas = tuple(float(g) for g in self.gammas)
        self.bias_strengths = tuple(float(b) for b in self.bias_strengths)
        if any(g <= 0 for g in self.gammas):
            raise ValueError(f"gammas must be > 0, got {self.gammas}")
        if any(not 0 < b < 1 for b in self.bias_strengths):
            raise ValueError(f"bias_strengths must be in (0, 1), got {self.bias_strengths}")


def model_info(meta: dict) -> dict:
    """The parts of a registry ``meta.json`` a reader of the report needs."""
    mcfg = meta.get("model_config", {})
    keep = ("version", "created", "kind", "strategy", "sites", "epochs", "rounds", "round", "run_name")
    info = {k: meta[k] for k in keep if k in meta}
    info.update(
        {
            "norm": mcfg.get("norm"),
            "channels": mcfg.get("channels"),
            "fedbn": meta.get("fedbn", False),
            "zscore": meta.get("data_config", {}).get("zscore", False),
            "spacing": meta.get("data_config", {}).get("spacing"),
        }
    )
    return info


def _histograms(evaluations: Sequence[SiteEvaluation], bins: int = 80) -> dict[str, dict]:
    """Per-site densities on common bins spanning every site's 0.1-99.9 percentile range."""
    present = [e for e in evaluations if e.intensities.size]
    if not present:
        return {}
    lo = min(float(np.percentile(e.intensities, 0.1)) for e in present)
    hi = max(float(np.percentile(e.intensities, 99.9)) for e in present)
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    out = {}
    for e in present:
        density, _ = np.histogram(e.intensities, bins=edges, density=True)
        p1, p50, p99 = np.percentile(e.intensities, [1, 50, 99])
        out[e.site] = {
            "edges": edges.tolist(),
            "density": density.tolist(),
            "p1": float(p1),
            "median": float(p50),
            "p99": float(p99),
            "min": float(e.intensities.min()),
            "max": float(e.intensities.max()),
        }
    return out


def _invariance(evaluations: Sequence[SiteEvaluation], options: ReportOptions) -> dict:
    affine = {}
    for e in evaluations:
        summary = summarize_checks(e.affine_checks)
        affine[e.site] = {
            "dice_min": summary["min"],
            "dice_mean": summary["mean"],
            "n_maps": summary["n"],
            "voxel_agreement_min": summarize_checks(e.affine_checks, "voxel_agreement")["min"],
        }
    all_affine = [c for e in evaluations for c in e.affine_checks]
    overall = summarize_checks(all_affine)
    stops = []
    levels = [("gamma", g) for g in options.gammas] + [("bias", b) for b in options.bias_strengths]
    for kind, level in levels:
        per_site = {}
        for e in evaluations:
            recs = [c for c in e.stop_checks if c["kind"] == kind and math.isclose(c["level"], level)]
            s = summarize_checks(recs)
            per_site[e.site] = {"dice_mean": s["mean"], "dice_min": s["min"]}
        recs = [c for e in evaluations for c in e.stop_checks if c["kind"] == kind and math.isclose(c["level"], level)]
        s = summarize_checks(recs)
        stops.append({"kind": kind, "level": level, "dice_mean": s["mean"], "dice_min": s["min"], "sites": per_site})
    return {
        "k": options.k,
        "scale_range": list(SCALE_RANGE),
        "shift_range": list(SHIFT_RANGE),
        "score": overall["mean"],
        "dice_min": overall["min"],
        "dice_mean": overall["mean"],
        "sites": affine,
        "stops": stops,
        "checks": {e.site: {"affine": e.affine_checks, "stops": e.stop_checks} for e in evaluations},
    }


def factor_sites(rows: Sequence[dict], data_dir: str | Path) -> list[dict]:
    """The study's one-factor sites (scanner.json ``extra.factor``): each one's Dice and its cost against the
    reference site (factor ``none``), i.e. how much Dice that single scanner factor costs this model."""
    from shared.synth import site_factor

    if not data_dir:
        return []
    factors = {r["site"]: site_factor(Path(data_dir) / r["site"]) for r in rows}
    ref = next((r for r in rows if factors[r["site"]] == "none"), None)
    if ref is None:
        return []
    out = []
    for r in rows:
        if factors[r["site"]] and r is not ref:
            dice, tissue = r["dice"]["mean"]["mean"], r["dice"]["tissue"]["mean"]
            out.append({
                "site": r["site"], "factor": factors[r["site"]], "reference": ref["site"], "dice": dice,
                "tissue": tissue, "dice_cost": ref["dice"]["mean"]["mean"] - dice,
                "tissue_cost": ref["dice"]["tissue"]["mean"] - tissue,
            })
    return out


def ood_summary(record: dict | None) -> dict | None:
    """What the report shows of a model's OOD record: each site's volume count (the sites shared aggregates
    only), the threshold and its rule, and the score each "where instance norm stops" level reaches."""
    if not record:
        return None
    return {
        "threshold": record.get("threshold"),
        "threshold_rule": record.get("threshold_rule", ""),
        "sites": {name: {"n": ref.get("n")} for name, ref in sorted(record.get("sites", {}).items())},
        "stops": [{"kind": s["kind"], "level": s["level"], "score": s["score"]} for s in record.get("stops", [])],
    }


def assemble_report(
    evaluations: Sequence[SiteEvaluation],
    skipped: Sequence[dict],
    model: dict,
    options: ReportOptions,
    history: RoundHistory | None = None,
    history_note: str = "",
    data_dir: str = "",
    ood: dict | None = None,
) -> tuple[dict, dict[str, bytes]]:
    """Turn per-site evaluations (and the model's OOD record, ``shared.ood``) into the report dict and figures."""
    per_case = {e.site: [c["dice"] for c in e.cases] for e in evaluations}
    rows = site_table(
        per_case, FOREGROUND, n_resamples=options.n_resamples, seed=options.seed, groups={"tissue": TISSUE_LABELS}
    )
    for row, e in zip(rows, evaluations):
        row["hd95"] = {
            k: nanmean(c["hd95"].get(k, math.nan) for c in e.cases) if options.hd95 else math.nan for k in FOREGROUND
        }
        row["cases"] = e.cases
    fairness = summarize_sites({r["site"]: r["dice"]["mean"]["mean"] for r in rows}, options.threshold)
    tissue = summarize_sites({r["site"]: r["dice"]["tissue"]["mean"] for r in rows}, options.threshold)
    for row in rows:
        row["flagged"] = row["site"] in fairness.flagged
    invariance = _invariance(evaluations, options)
    for row in rows:
        row["invariance"] = invariance["sites"][row["site"]]
    invariance["factor_sites"] = factor_sites(rows, data_dir)
    histograms = _histograms(evaluations)
    report = {
        "title": f"Per-site fairness report: model {model.get('version', '?')}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_dir": str(data_dir),
        "model": model,
        "options": asdict(options),
        "labels": FOREGROUND,
        "sites": rows,
        "skipped": list(skipped),
        "fairness": {"metric": "mean foreground Dice per site", **fairness.to_dict()},
        "fairness_tissue": {"metric": "mean grey/white matter Dice per site", **tissue.to_dict()},
        "invariance": invariance,
        "histograms": histograms,
        "history": history.to_dict() if history else None,
        "history_note": history_note,
        "ood": ood_summary(ood),
    }
    figs: dict[str, bytes] = {}
    if rows:
        figs["dice"] = figures.dice_by_site(rows, options.threshold)
        figs["examples"] = figures.example_slices({e.site: e.example for e in evaluations if e.example})
    if histograms:
        figs["histograms"] = figures.intensity_histograms(histograms)
    if invariance["stops"] and evaluations:
        stops: dict[str, dict] = {}
        for s in invariance["stops"]:
            for site, v in s["sites"].items():
                stops.setdefault(s["kind"], {}).setdefault(site, []).append((s["level"], v["dice_mean"]))
        figs["stops"] = figures.where_in_stops_plot({k: v["dice_mean"] for k, v in invariance["sites"].items()}, stops)
    if history and history.rounds:
        figs["history"] = figures.history_plot(history.rounds, history.sites)
    return report, figs
