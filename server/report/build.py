"""Assemble, render and write the per-site fairness report of one registered model.

``generate_report`` is the entry point the CLI and the API call: load the model from the
registry, evaluate it on every site (``server.report.evaluation``), summarise fairness
(``server.report.fairness``) and invariance (``server.report.invariance``), add the
federation's per-round history when a run log is known, and write::

    OUT/report.html   self-contained (inline CSS, base64 PNGs, no external resource)
    OUT/report.json   every number, NaN written as null
    OUT/report.csv    every number of report.json, one "key,value" row each
    OUT/sites.csv     one row per site (the main table)
    OUT/predictions/<site>/<case>.nii.gz   predicted label maps (model voxel grid)
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from shared.metrics import FOREGROUND_LABELS, nanmean
from shared.synth import LABELS

from server.report import figures
from server.report.evaluation import SiteEvaluation, evaluate_sites
from server.report.fairness import site_table, summarize_sites
from server.report.history import RoundHistory, find_run_log, read_history
from server.report.invariance import DEFAULT_BIAS_STRENGTHS, DEFAULT_GAMMAS, SCALE_RANGE, SHIFT_RANGE, summarize_checks
from server.report.render import fmt, image, page, table

__all__ = ["ReportOptions", "ReportResult", "assemble_report", "render_report", "write_report", "generate_report",
           "flatten_numbers", "to_jsonable", "model_info"]

log = logging.getLogger(__name__)

FOREGROUND = {k: LABELS[k] for k in FOREGROUND_LABELS}
# Grey and white matter occur in every case; lesions in some. A site's all-label mean therefore
# also reflects how many of its cases have a lesion, so fairness is summarised on both.
TISSUE_LABELS = (1, 2)


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


@dataclass
class ReportResult:
    report: dict
    files: dict[str, Path] = field(default_factory=dict)


def to_jsonable(obj):
    """Plain JSON types: NaN/Inf -> None, numpy scalars -> Python, tuples -> lists, keys -> str."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def flatten_numbers(obj, prefix: str = "") -> list[tuple[str, float | int | None]]:
    """Every numeric leaf of a JSON-like object as ``("sites.0.dice.1.mean", 0.83)`` pairs."""
    out: list[tuple[str, float | int | None]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += flatten_numbers(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += flatten_numbers(v, f"{prefix}.{i}" if prefix else str(i))
    elif isinstance(obj, bool):
        pass
    elif isinstance(obj, (int, float)) or obj is None and prefix:
        out.append((prefix, obj))
    return out


def model_info(meta: dict) -> dict:
    """The parts of a registry ``meta.json`` a reader of the report needs."""
    mcfg = meta.get("model_config", {})
    keep = ("version", "created", "kind", "strategy", "sites", "epochs", "rounds", "round", "run_name")
    info = {k: meta[k] for k in keep if k in meta}
    info.update({"norm": mcfg.get("norm"), "channels": mcfg.get("channels"), "fedbn": meta.get("fedbn", False),
                 "zscore": meta.get("data_config", {}).get("zscore", False), "spacing": meta.get("data_config", {}).get("spacing")})
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
        out[e.site] = {"edges": edges.tolist(), "density": density.tolist(), "p1": float(p1), "median": float(p50),
                       "p99": float(p99), "min": float(e.intensities.min()), "max": float(e.intensities.max())}
    return out


def _invariance(evaluations: Sequence[SiteEvaluation], options: ReportOptions) -> dict:
    affine = {}
    for e in evaluations:
        summary = summarize_checks(e.affine_checks)
        affine[e.site] = {"dice_min": summary["min"], "dice_mean": summary["mean"], "n_maps": summary["n"],
                          "voxel_agreement_min": summarize_checks(e.affine_checks, "voxel_agreement")["min"]}
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


def assemble_report(
    evaluations: Sequence[SiteEvaluation],
    skipped: Sequence[dict],
    model: dict,
    options: ReportOptions,
    history: RoundHistory | None = None,
    history_note: str = "",
    data_dir: str = "",
) -> tuple[dict, dict[str, bytes]]:
    """Turn per-site evaluations into the report dict and its figures (PNG bytes)."""
    per_case = {e.site: [c["dice"] for c in e.cases] for e in evaluations}
    rows = site_table(per_case, FOREGROUND, n_resamples=options.n_resamples, seed=options.seed, groups={"tissue": TISSUE_LABELS})
    for row, e in zip(rows, evaluations):
        row["hd95"] = {k: nanmean(c["hd95"].get(k, math.nan) for c in e.cases) if options.hd95 else math.nan for k in FOREGROUND}
        row["cases"] = e.cases
    fairness = summarize_sites({r["site"]: r["dice"]["mean"]["mean"] for r in rows}, options.threshold)
    tissue = summarize_sites({r["site"]: r["dice"]["tissue"]["mean"] for r in rows}, options.threshold)
    for row in rows:
        row["flagged"] = row["site"] in fairness.flagged
    invariance = _invariance(evaluations, options)
    for row in rows:
        row["invariance"] = invariance["sites"][row["site"]]
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


def _site_section(report: dict) -> str:
    labels = report["labels"]
    headers = ["site", "cases"] + [f"Dice {n} (95% CI)" for n in labels.values()] + ["mean Dice (95% CI)", "tissue Dice GM+WM (95% CI)"]
    headers += [f"HD95 {n} (mm)" for n in labels.values()]
    rows, classes = [], []
    for r in report["sites"]:
        ci = lambda d: f"{fmt(d['mean'])} [{fmt(d['low'])}, {fmt(d['high'])}]"  # noqa: E731
        rows.append([r["site"], r["n_cases"]] + [ci(r["dice"][k]) for k in labels] + [ci(r["dice"]["mean"]), ci(r["dice"]["tissue"])]
                    + [r["hd95"][k] for k in labels])
        classes.append("flag" if r["flagged"] else "ok")
    note = (f'<p class="note">Intervals: percentile bootstrap over cases ({report["options"]["n_resamples"]} resamples); '
            "a site with one case has a zero-width interval. Lesion Dice is averaged over cases that contain a lesion. "
            f"Rows in red score below the threshold {fmt(report['fairness']['threshold'], 2)}.</p>")
    return table(headers, rows, classes) + note


def _fairness_section(report: dict, figs: dict[str, bytes]) -> str:
    f, t = report["fairness"], report["fairness_tissue"]
    rows = [["worst site", f["worst_site"] or "–", t["worst_site"] or "–"], ["worst Dice", f["worst"], t["worst"]],
            ["best site", f["best_site"] or "–", t["best_site"] or "–"], ["best Dice", f["best"], t["best"]],
            ["best − worst gap", f["gap"], t["gap"]], ["worst / best ratio", f["ratio"], t["ratio"]],
            ["standard deviation over sites", f["std"], t["std"]], ["mean over sites", f["mean"], t["mean"]],
            ["threshold", f["threshold"], t["threshold"]],
            ["flagged sites (below threshold)", ", ".join(f["flagged"]) or "none", ", ".join(t["flagged"]) or "none"]]
    out = table(["across sites", "mean Dice (all labels)", "tissue Dice (GM+WM)"], rows, cls="kv")
    out += ('<p class="note">Lesions occur in some cases only, so the all-label mean also reflects each site\'s lesion '
            "count; the tissue column compares sites on labels every case has.</p>")
    if "dice" in figs:
        out += image(figs["dice"], "mean Dice per site with 95% intervals")
    return out


def _invariance_section(report: dict, figs: dict[str, bytes]) -> str:
    inv = report["invariance"]
    if not inv["k"]:
        return '<p class="note">Skipped (k = 0).</p>'
    rows = [[site, v["n_maps"], fmt(v["dice_min"], 4), fmt(v["dice_mean"], 4), fmt(v["voxel_agreement_min"], 4)]
            for site, v in inv["sites"].items()]
    out = (f"<p>Each test volume was mapped by {inv['k']} random <code>x → s·x + b</code> with s log-uniform in "
           f"[{inv['scale_range'][0]:g}, {inv['scale_range'][1]:g}] and b uniform in [{inv['shift_range'][0]:g}, "
           f"{inv['shift_range'][1]:g}]; the table compares the predicted label maps before and after "
           "(Dice over labels present in either map). Instance norm should give 1.000.</p>")
    out += table(["site", "maps", "min Dice", "mean Dice", "min voxel agreement"], rows)
    out += (f"<p><b>Invariance score</b> (mean over all sites and maps): {fmt(inv['score'], 4)}; "
            f"worst single map: {fmt(inv['dice_min'], 4)}.</p>")
    return out


def _stops_section(report: dict, figs: dict[str, bytes]) -> str:
    inv = report["invariance"]
    if not inv["stops"]:
        return '<p class="note">Skipped (no gamma or bias levels).</p>'
    sites = list(inv["sites"])
    headers = ["perturbation", "level"] + sites + ["mean", "min"]
    rows = [["affine s·x+b (reference)", "–"] + [inv["sites"][s]["dice_mean"] for s in sites] + [inv["dice_mean"], inv["dice_min"]]]
    for s in inv["stops"]:
        name = "gamma curve x^γ" if s["kind"] == "gamma" else "smooth bias field"
        rows.append([name, s["level"]] + [s["sites"][site]["dice_mean"] for site in sites] + [s["dice_mean"], s["dice_min"]])
    out = ("<p>Instance norm removes one scale and one offset per feature map. It cannot undo a non-linear "
           "contrast curve or a spatially varying bias field; the agreement below falls as those grow. These "
           "perturbations use <code>shared.scanner</code>, the same code that simulates the hospitals.</p>")
    out += table(headers, rows)
    if "stops" in figs:
        out += image(figs["stops"], "agreement Dice against gamma and bias strength")
    return out


def render_report(report: dict, figs: dict[str, bytes]) -> str:
    """The report as one self-contained HTML document."""
    model = report["model"]
    subtitle = (f"norm={model.get('norm')}, strategy={model.get('strategy', '?')}, trained on "
                f"{', '.join(model.get('sites') or []) or '?'}; evaluated on held-out imagesTs/labelsTs of "
                f"{report['data_dir']} at {report['created']}")
    sections = [("Sites", _site_section(report)), ("Fairness across sites", _fairness_section(report, figs))]
    if report["skipped"]:
        items = "".join(f"<li><b>{html.escape(s['site'])}</b>: {html.escape(s['error'])}</li>" for s in report["skipped"])
        sections.append(("Skipped sites", f'<ul class="skip">{items}</ul>'))
    sections.append(("Invariance certificate", _invariance_section(report, figs)))
    sections.append(("Where instance norm stops", _stops_section(report, figs)))
    if "histograms" in figs:
        hist_rows = [[s, h["min"], h["p1"], h["median"], h["p99"], h["max"]] for s, h in report["histograms"].items()]
        sections.append(("Raw intensities per site",
                         image(figs["histograms"], "raw intensity histograms") + table(["site", "min", "p1", "median", "p99", "max"], hist_rows, cls="")))
    if "examples" in figs:
        sections.append(("Example slices", '<p class="note">Orange: grey matter, blue: white matter, red: lesion.</p>'
                         + image(figs["examples"], "example slices with predicted masks")))
    if "history" in figs:
        h = report["history"]
        rows = [[s] + list(v) for s, v in h["sites"].items()]
        sections.append(("Federated rounds", image(figs["history"], "per-site Dice over rounds")
                         + table(["site"] + [f"round {r}" for r in h["rounds"]], rows)))
    elif report.get("history_note"):
        sections.append(("Federated rounds", f'<p class="note">{html.escape(report["history_note"])}</p>'))
    return page(report["title"], sections, subtitle)


def _site_csv_rows(report: dict) -> list[dict]:
    rows = []
    for r in report["sites"]:
        row = {"site": r["site"], "n_cases": r["n_cases"], "flagged": r["flagged"]}
        for k, d in r["dice"].items():
            row.update({f"dice_{k}": d["mean"], f"dice_{k}_low": d["low"], f"dice_{k}_high": d["high"]})
        row.update({f"hd95_{k}": v for k, v in r["hd95"].items()})
        row.update({f"affine_{k}": v for k, v in r["invariance"].items()})
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if (isinstance(v, float) and not math.isfinite(v)) or v is None else v for k, v in row.items()})


def write_report(report: dict, figs: dict[str, bytes], out_dir: str | Path) -> dict[str, Path]:
    """Write report.html, report.json, report.csv and sites.csv into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = to_jsonable(report)
    files = {"html": out / "report.html", "json": out / "report.json", "csv": out / "report.csv", "sites_csv": out / "sites.csv"}
    files["html"].write_text(render_report(report, figs), encoding="utf-8")
    files["json"].write_text(json.dumps(clean, indent=1) + "\n")
    write_csv(files["csv"], [{"key": k, "value": v} for k, v in flatten_numbers(clean)])
    write_csv(files["sites_csv"], _site_csv_rows(report))
    return files


def generate_report(
    registry: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    version: str | None = None,
    options: ReportOptions | None = None,
) -> ReportResult:
    """Evaluate registered model ``version`` (default: the served one) and write its report.

    Files are written to a temporary sibling folder and moved into ``out_dir`` at the end, so a
    reader never sees half a report.

    Raises:
        FileNotFoundError: no such model, or the data folder has no site.
    """
    import torch

    from shared.errors import InvalidSiteError
    from shared.registry import data_config_from_meta, load_model

    options = options or ReportOptions()
    torch.manual_seed(options.seed)
    model, meta = load_model(registry, version)
    cfg = data_config_from_meta(meta)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    try:
        evaluations, skipped = evaluate_sites(
            model, data_dir, cfg, sites=options.sites, k=options.k, gammas=options.gammas,
            bias_strengths=options.bias_strengths, seed=options.seed, hd95=options.hd95,
            predictions_dir=tmp / "predictions" if options.save_predictions else None,
        )
    except InvalidSiteError as exc:  # no site folder at all
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileNotFoundError(str(exc)) from None
    history, note = None, "No federation run log for this model (it was not trained by `fedmri federate`)."
    log_path = Path(options.run_log) if options.run_log else find_run_log(meta, registry)
    if log_path is not None:
        try:
            history = read_history(log_path)
            note = "" if history.rounds else f"run log {log_path} holds no round records"
        except (OSError, ValueError) as exc:
            note = f"run log {log_path} could not be read: {exc}"
    report, figs = assemble_report(evaluations, skipped, model_info(meta), options, history, note, str(data_dir))
    report["seconds"] = time.perf_counter() - start

    files = write_report(report, figs, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return ReportResult(report, {k: out / p.name for k, p in files.items()})
