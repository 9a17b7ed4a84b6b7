"""Rendering the ablation's results (``server.experiments.ablation`` runs it): Markdown, HTML, CSV, JSON."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from shared.metrics import nanmean

from server.report import figures
from server.report.export import to_jsonable, write_csv
from server.report.render import fmt, image, page, table

__all__ = ["render_ablation_markdown", "render_ablation_html", "write_ablation"]


def _budget(results: dict) -> str:
    """The shared training budget and sizes, from the base run config recorded with the results."""
    run = results["config"]["run"]
    return (f"{run['num-server-rounds']} rounds x {run['local-epochs']} local epochs (centralised: "
            f"{results['budget_epochs']} epochs), spacing {run['spacing']} mm, crops {run['roi-size']}, "
            f"channels {run['channels']}, lr {run['lr']}, seed {run['seed']}")


def _sites_of(results: dict) -> list[str]:
    return sorted({s for v in results["variants"] for s in v["sites"]} | set(results.get("cross_site") or {}))


def _csv_rows(results: dict) -> list[dict]:
    rows = []
    for v in results["variants"]:
        for site, s in v["sites"].items():
            row = {"variant": v["name"], "site": site, "n_cases": s["n_cases"], "dice": s["dice"], "tissue_dice": s.get("tissue_dice"),
                   **{f"dice_{k}": d for k, d in s["dice_per_label"].items()},
                   "invariance_mean": s["invariance_mean"], "invariance_min": s["invariance_min"],
                   "fed_val_last_round": (v.get("fed_val_last_round") or {}).get(site, math.nan)}
            rows.append(row)
    tissue = results.get("cross_site_tissue") or {}
    for trained_on, cols in (results.get("cross_site") or {}).items():
        for site, dice in cols.items():
            rows.append({"variant": f"local-in[{trained_on}]", "site": site, "dice": dice,
                         "tissue_dice": tissue.get(trained_on, {}).get(site)})
    return rows


def render_ablation_markdown(results: dict) -> str:
    """A Markdown summary (per-site Dice, gap, worst site, invariance) for bench/results and the README."""
    sites = _sites_of(results)
    c = results["config"]
    lines = [
        f"Data: `{results['data_dir']}`; {_budget(results)}; invariance: k={c['k']} random s*x+b per test volume. "
        f"Total {results.get('seconds', 0) / 60:.1f} min.",
        "",
        "| variant | " + " | ".join(sites) + " | mean | worst site | gap | invariance (mean / min) |",
        "|---|" + "---:|" * len(sites) + "---:|---|---:|---:|",
    ]
    lines.insert(1, "")
    lines.insert(2, "Mean Dice over grey matter, white matter and lesion (per case, labels absent from a case skipped), "
                    "held-out test cases:")
    for v in results["variants"]:
        cells = [fmt(v["sites"].get(s, {}).get("dice")) for s in sites]
        lines.append(f"| {v['title']} | " + " | ".join(cells) + f" | {fmt(v['mean_dice'])} | {v['worst_site']} "
                     f"({fmt(v['worst_dice'])}) | {fmt(v['gap'])} | {fmt(v['invariance'], 4)} / {fmt(v['invariance_min'], 4)} |")
    lines += ["", "Tissue Dice (mean of grey and white matter, present in every case):", "",
              "| variant | " + " | ".join(sites) + " | mean | worst site | gap | worst/best |",
              "|---|" + "---:|" * len(sites) + "---:|---|---:|---:|"]
    for v in results["variants"]:
        t = v.get("tissue") or {}
        cells = [fmt(v["sites"].get(s, {}).get("tissue_dice")) for s in sites]
        lines.append(f"| {v['title']} | " + " | ".join(cells) + f" | {fmt(t.get('mean'))} | {t.get('worst_site')} "
                     f"({fmt(t.get('worst'))}) | {fmt(t.get('gap'))} | {fmt(t.get('ratio'))} |")
    for key, what in (("cross_site", "mean Dice"), ("cross_site_tissue", "tissue Dice")):
        if results.get(key):
            lines += ["", f"Local-only IN models, cross-site {what} (row: trained on, column: evaluated on):", "",
                      "| trained on | " + " | ".join(sites) + " |", "|---|" + "---:|" * len(sites)]
            for trained_on, cols in results[key].items():
                lines.append(f"| {trained_on} | " + " | ".join(fmt(cols.get(s)) for s in sites) + " |")
    fed = [v for v in results["variants"] if v.get("fed_val_last_round")]
    if fed:
        lines += ["", "Federated validation Dice of the last round (each site's own split; FedBN with its local norm layers):", "",
                  "| variant | " + " | ".join(sites) + " |", "|---|" + "---:|" * len(sites)]
        for v in fed:
            lines.append(f"| {v['title']} | " + " | ".join(fmt(v['fed_val_last_round'].get(s)) for s in sites) + " |")
    return "\n".join(lines) + "\n"


def render_ablation_html(results: dict) -> str:
    sites = _sites_of(results)
    variants = results["variants"]
    headers = ["variant"] + sites + ["mean", "worst site", "worst", "gap", "worst/best", "std", "invariance mean", "invariance min", "minutes"]
    rows = [[v["title"]] + [v["sites"].get(s, {}).get("dice") for s in sites]
            + [v["mean_dice"], v["worst_site"] or "–", v["worst_dice"], v["gap"], v["ratio"], v["std"],
               v["invariance"], v["invariance_min"], v["seconds"] / 60] for v in variants]
    c = results["config"]
    intro = (f"<p>Same data, rounds and budget for every variant: {html.escape(_budget(results))}. "
             "Dice: mean foreground Dice on each site's held-out "
             f"test cases. Invariance: Dice between predictions before and after {c['k']} random s·x+b maps per test volume "
             "(s in [0.2, 5], b in [−1000, 1000]). The FedBN row evaluates its global checkpoint (averaged norm layers); "
             "its local-norm performance is the federated validation Dice below.</p>")
    tissue_rows = [[v["title"]] + [v["sites"].get(s, {}).get("tissue_dice") for s in sites]
                   + [(v.get("tissue") or {}).get(k) for k in ("mean", "worst_site", "worst", "gap", "ratio", "std")] for v in variants]
    sections = [("Per-site Dice, gap, worst site and invariance", intro + table(headers, rows)),
                ("Tissue Dice (grey and white matter)",
                 "<p>Lesions occur in some test cases only, so the mean over all labels also reflects each site's lesion count; "
                 "grey and white matter are in every case.</p>"
                 + table(["variant"] + sites + ["mean", "worst site", "worst", "gap", "worst/best", "std"], tissue_rows))]
    if variants:
        sections.append(("Per-site Dice by variant", image(
            figures.grouped_bars(sites, {v["name"]: [v["sites"].get(s, {}).get("dice", math.nan) for s in sites] for v in variants},
                                 "mean Dice (test)", results["config"]["threshold"]), "per-site Dice by variant")))
        sections.append(("Invariance by variant", image(
            figures.grouped_bars(sites, {v["name"]: [v["sites"].get(s, {}).get("invariance_mean", math.nan) for s in sites] for v in variants},
                                 "Dice(pred(x), pred(s·x+b))"), "invariance by variant")))
    for key, what in (("cross_site", "mean Dice"), ("cross_site_tissue", "tissue Dice")):
        if results.get(key):
            m = results[key]
            sections.append((f"Local-only models across sites ({what})",
                             "<p>Row: the site a model was trained on; column: the site it is evaluated on.</p>"
                             + table(["trained on \\ evaluated on"] + sites, [[t] + [cols.get(s) for s in sites] for t, cols in m.items()])))
    fed = [v for v in variants if v.get("fed_val_last_round")]
    if fed:
        sections.append(("Federated validation Dice, last round", table(
            ["variant"] + sites, [[v["title"]] + [v["fed_val_last_round"].get(s) for s in sites] for v in fed])))
        curves = {v["name"]: (v["history"]["rounds"], [nanmean(vals) for vals in zip(*v["history"]["sites"].values())]) for v in fed
                  if v["history"]["rounds"]}
        if curves:
            sections.append(("Mean federated validation Dice over rounds", image(
                figures.history_plot(next(iter(curves.values()))[0], {k: c[1] for k, c in curves.items()}), "validation Dice over rounds")))
    if results.get("skipped"):
        items = "".join(f"<li>{html.escape(k)}: {html.escape(json.dumps(v))}</li>" for k, v in results["skipped"].items())
        sections.append(("Skipped sites", f"<ul>{items}</ul>"))
    return page("Normalisation ablation: who is left behind?", sections,
                f"{len(variants)} variants, total {results.get('seconds', 0) / 60:.1f} min")


def write_ablation(results: dict, out: Path, seconds: float) -> None:
    """ablation.{json,csv,md,html} in ``out``; called after every variant so partial results survive."""
    out.mkdir(parents=True, exist_ok=True)
    snapshot = {**results, "seconds": results.get("seconds", seconds)}
    (out / "ablation.json").write_text(json.dumps(to_jsonable(snapshot), indent=1) + "\n")
    write_csv(out / "ablation.csv", _csv_rows(snapshot))
    (out / "ablation.md").write_text(render_ablation_markdown(snapshot))
    (out / "ablation.html").write_text(render_ablation_html(snapshot), encoding="utf-8")
