"""Rendering the ablation's results (``server.experiments.ablation`` runs it): Markdown, HTML, CSV, JSON.

Every sentence here that compares variants is generated from the paired bootstrap intervals in the
results (``results["claims"]``, ``server.experiments.stats.claim``); nothing is written by hand.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

from server.report import figures
from server.report.export import to_jsonable, write_csv
from server.report.render import fmt, image, page, table
from shared.metrics import nanmean

__all__ = [
    "render_ablation_markdown",
    "render_ablation_html",
    "write_ablation",
    "update_readme",
    "README_BEGIN",
    "README_END",
]

README_BEGIN = "<!-- ablation:begin (generated from bench/results/ablation.md by fedmri ablation; do not edit) -->"
README_END = "<!-- ablation:end -->"


def _budget(results: dict) -> str:
    """The shared training budget and sizes, from the base run config recorded with the results."""
    run = results["config"]["run"]
    seeds = results["config"].get("seeds") or [run["seed"]]
    steps = run.get("max-steps") or 0
    work = (
        f"{run['num-server-rounds']} rounds x {steps} optimiser steps per site (centralised: the same steps per "
        f"site, pooled: all sites' steps)"
        if steps
        else f"{run['num-server-rounds']} rounds x {run['local-epochs']} local epochs (centralised: "
        f"{results['budget_epochs']} epochs)"
    )
    return (
        f"{work}, spacing {run['spacing']} mm, crops {run['roi-size']}, "
        f"channels {run['channels']}, lr {run['lr']}, seeds {','.join(str(s) for s in seeds)}"
    )


def _sites_of(results: dict) -> list[str]:
    return sorted({s for v in results["variants"] for s in v["sites"]} | set(results.get("cross_site") or {}))


def _pm(mean, sd) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None and math.isfinite(sd) else f"{mean:.3f}"


def _ci(c: dict | None) -> str:
    if not c or not c.get("n"):
        return "–"
    star = "*" if c["low"] > 0 or c["high"] < 0 else ""
    return f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]{star}"


def _csv_rows(results: dict) -> list[dict]:
    rows = []
    for v in results["variants"]:
        for seed, per_site in (v.get("seeds") or {}).items():
            for site, s in per_site.items():
                rows.append({
                    "variant": v["name"],
                    "seed": seed,
                    "site": site,
                    "n_cases": s["n_cases"],
                    "dice": s["dice"],
                    "tissue_dice": s.get("tissue_dice"),
                    **{f"dice_{k}": d for k, d in s["dice_per_label"].items()},
                    "invariance_mean": s["invariance_mean"],
                    "invariance_min": s["invariance_min"],
                })
    tissue = results.get("cross_site_tissue") or {}
    for trained_on, cols in (results.get("cross_site") or {}).items():
        for site, dice in cols.items():
            rows.append({"variant": f"local-in[{trained_on}]", "site": site, "dice": dice,
                         "tissue_dice": tissue.get(trained_on, {}).get(site)})
    for site, dice in (results.get("cross_site_federated") or {}).items():
        rows.append({"variant": "fed-in[federation]", "site": site, "dice": dice,
                     "tissue_dice": (results.get("cross_site_federated_tissue") or {}).get(site)})
    return rows


def _factor_columns(results: dict) -> list[tuple[str, str]]:
    """(site, factor) of every factor site, in site order."""
    f = results.get("factors") or {}
    sites = {s for costs in (f.get("costs") or {}).values() for s in costs}
    factors = results.get("site_factors") or {}
    return [(s, factors.get(s) or "?") for s in sorted(sites)]


def _n_cases(results: dict) -> str:
    counts = sorted({s["n_cases"] for v in results["variants"] for s in v["sites"].values()})
    return f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}" if counts else "0"


def render_ablation_markdown(results: dict) -> str:
    """A Markdown summary for bench/results and the README: seed means ± sd, paired CIs, generated claims."""
    sites = _sites_of(results)
    c = results["config"]
    seeds = c.get("seeds") or [c["run"]["seed"]]
    note = results.get("note")
    lines = []
    if note:
        lines += [f"**{note}**", ""]
    lines += [
        f"Data: `{results['data_dir']}`; {_budget(results)}; invariance: k={c['k']} random s*x+b per test volume "
        f"(first seed). Total {results.get('seconds', 0) / 60:.1f} min.",
        "",
        f"Mean foreground Dice (grey matter, white matter, lesion; per case, labels absent from a case skipped) on "
        f"{_n_cases(results)} held-out test cases per site, mean ± sd over {len(seeds)} seed(s):",
        "",
        "| variant | " + " | ".join(sites) + " | mean | worst site | invariance (mean / min) |",
        "|---|" + "---:|" * len(sites) + "---:|---|---:|",
    ]
    for v in results["variants"]:
        cells = [_pm(v["sites"].get(s, {}).get("dice"), v["sites"].get(s, {}).get("sd")) for s in sites]
        lines.append(
            f"| {v['title']} | " + " | ".join(cells) + f" | {fmt(v['mean_dice'])} | {v['worst_site']} "
            f"({fmt(v['worst_dice'])}) | {fmt(v['invariance'], 4)} / {fmt(v['invariance_min'], 4)} |"
        )
    comparisons = results.get("comparisons") or {}
    labels = sorted({lab for per in comparisons.values() for lab in per},
                    key=lambda lab: (not lab.startswith(("IN − BN", "IN − pooled", "IN − local")), lab))
    if comparisons:
        lines += [
            "",
            "Paired per-case differences (federated IN minus the other row; each case's Dice averaged over seeds), "
            "mean [bootstrap 95% CI]; * the CI excludes 0:",
            "",
            "| site | " + " | ".join(labels) + " |",
            "|---|" + "---:|" * len(labels),
        ]
        for site in sorted(comparisons):
            lines.append(f"| {site} | " + " | ".join(_ci(comparisons[site].get(lab)) for lab in labels) + " |")
    if results.get("claims"):
        lines += ["", "Generated from the intervals above (\"better\" only where the 95% CI excludes 0):", ""]
        lines += [f"- {s}" for s in results["claims"]]
    factor_cols = _factor_columns(results)
    if factor_cols:
        ref = results["factors"]["reference"]
        lines += [
            "",
            f"Where instance norm stops: Dice cost of each factor = Dice({ref}) − Dice(factor site), "
            "mean ± sd over seeds (sites hold different subjects, so this includes case-mix noise):",
            "",
            "| variant | " + " | ".join(f"{f} ({s})" for s, f in factor_cols) + " |",
            "|---|" + "---:|" * len(factor_cols),
        ]
        for v in results["variants"]:
            costs = results["factors"]["costs"].get(v["name"], {})
            lines.append(f"| {v['title']} | " + " | ".join(
                _pm(costs.get(s, {}).get("mean"), costs.get(s, {}).get("sd")) for s, _ in factor_cols) + " |")
    for key, fed_key, what in (("cross_site", "cross_site_federated", "mean Dice"),
                               ("cross_site_tissue", "cross_site_federated_tissue", "tissue Dice")):
        if results.get(key):
            lines += [
                "",
                f"Cross-site {what}, first seed (row: trained on, column: evaluated on; last row: the federated IN "
                "model):",
                "",
                "| trained on | " + " | ".join(sites) + " |",
                "|---|" + "---:|" * len(sites),
            ]
            for trained_on, cols in results[key].items():
                lines.append(f"| {trained_on} | " + " | ".join(fmt(cols.get(s)) for s in sites) + " |")
            if results.get(fed_key):
                lines.append("| federated IN (all sites) | " + " | ".join(fmt(results[fed_key].get(s)) for s in sites)
                             + " |")
    timings = results.get("timings") or []
    if timings:
        per_variant: dict[str, float] = {}
        for t in timings:
            per_variant[t["variant"]] = per_variant.get(t["variant"], 0.0) + t["seconds"]
        lines += ["", "Minutes per variant (all seeds): " + ", ".join(
            f"{k} {v / 60:.1f}" for k, v in per_variant.items()) + "."]
    return "\n".join(lines) + "\n"


def render_ablation_html(results: dict) -> str:
    sites = _sites_of(results)
    variants = results["variants"]
    c = results["config"]
    seeds = c.get("seeds") or [c["run"]["seed"]]
    headers = ["variant"] + sites + ["mean", "worst site", "worst", "gap", "invariance mean", "invariance min"]
    rows = [
        [v["title"]]
        + [_pm(v["sites"].get(s, {}).get("dice"), v["sites"].get(s, {}).get("sd")) for s in sites]
        + [v["mean_dice"], v["worst_site"] or "–", v["worst_dice"], v["gap"], v["invariance"], v["invariance_min"]]
        for v in variants
    ]
    note = f"<p><strong>{html.escape(results['note'])}</strong></p>" if results.get("note") else ""
    intro = (
        f"{note}<p>Same data, rounds and budget for every variant: {html.escape(_budget(results))}. "
        f"Dice: mean foreground Dice on each site's {html.escape(_n_cases(results))} held-out test cases, mean ± sd "
        f"over {len(seeds)} seed(s). Invariance (first seed): Dice between predictions before and after {c['k']} "
        "random s·x+b maps per test volume (s in [0.2, 5], b in [−1000, 1000]). FedBN rows: <em>personalised</em> "
        "uses each site's own local layers (saved on its disk) on its own test cases; <em>new site</em> the "
        "averaged layers a hospital outside the federation would receive.</p>"
    )
    sections = [("Per-site Dice over seeds", intro + table(headers, rows))]
    comparisons = results.get("comparisons") or {}
    if comparisons:
        labels = sorted({lab for per in comparisons.values() for lab in per},
                        key=lambda lab: (not lab.startswith(("IN − BN", "IN − pooled", "IN − local")), lab))
        claims = "".join(f"<li>{html.escape(s)}</li>" for s in results.get("claims") or [])
        sections.append((
            "Paired differences and what they support",
            "<p>Per case: federated IN minus the other row, each case's Dice averaged over seeds; mean and "
            "bootstrap 95% CI over cases (* excludes 0).</p>"
            + table(["site"] + labels, [[s] + [_ci(comparisons[s].get(lab)) for lab in labels]
                                        for s in sorted(comparisons)])
            + f"<p>Generated sentences (\"better\" only where the CI excludes 0):</p><ul>{claims}</ul>",
        ))
    factor_cols = _factor_columns(results)
    if factor_cols:
        ref = results["factors"]["reference"]
        sections.append((
            "Where instance norm stops: Dice cost per factor",
            f"<p>Dice({html.escape(ref)}) − Dice(factor site), mean ± sd over seeds.</p>"
            + table(["variant"] + [f"{f} ({s})" for s, f in factor_cols],
                    [[v["title"]] + [_pm(results["factors"]["costs"].get(v["name"], {}).get(s, {}).get("mean"),
                                         results["factors"]["costs"].get(v["name"], {}).get(s, {}).get("sd"))
                                     for s, _ in factor_cols] for v in variants]),
        ))
    if variants:
        sections.append((
            "Per-site Dice by variant",
            image(figures.grouped_bars(
                sites, {v["name"]: [v["sites"].get(s, {}).get("dice", math.nan) for s in sites] for v in variants},
                "mean Dice (test)", c["threshold"]), "per-site Dice by variant"),
        ))
    for key, fed_key, what in (("cross_site", "cross_site_federated", "mean Dice"),
                               ("cross_site_tissue", "cross_site_federated_tissue", "tissue Dice")):
        if results.get(key):
            body = [[t] + [cols.get(s) for s in sites] for t, cols in results[key].items()]
            if results.get(fed_key):
                body.append(["federated IN (all sites)"] + [results[fed_key].get(s) for s in sites])
            sections.append((
                f"Local-only models across sites ({what}), first seed",
                "<p>Row: the site a model was trained on; column: the site it is evaluated on; last row: the "
                "federated IN model.</p>" + table(["trained on \\ evaluated on"] + sites, body),
            ))
    fed = [v for v in variants if v.get("fed_val_last_round")]
    if fed:
        sections.append((
            "Federated validation Dice, last round (first seed)",
            table(["variant"] + sites, [[v["title"]] + [v["fed_val_last_round"].get(s) for s in sites] for v in fed]),
        ))
        curves = {v["name"]: (v["history"]["rounds"], [nanmean(vals) for vals in zip(*v["history"]["sites"].values())])
                  for v in fed if v.get("history", {}).get("rounds")}
        if curves:
            sections.append((
                "Mean federated validation Dice over rounds",
                image(figures.history_plot(next(iter(curves.values()))[0], {k: v[1] for k, v in curves.items()}),
                      "validation Dice over rounds"),
            ))
    if results.get("skipped"):
        items = "".join(f"<li>{html.escape(k)}: {html.escape(json.dumps(v))}</li>"
                        for k, v in results["skipped"].items())
        sections.append(("Skipped sites", f"<ul>{items}</ul>"))
    return page("Harmonization study: who is left behind?", sections,
                f"{len(variants)} rows, {len(seeds)} seed(s), total {results.get('seconds', 0) / 60:.1f} min")


def write_ablation(results: dict, out: Path, seconds: float) -> None:
    """ablation.{json,csv,md,html} in ``out``; called after every variant so partial results survive."""
    out.mkdir(parents=True, exist_ok=True)
    snapshot = {**results, "seconds": results.get("seconds", seconds)}
    (out / "ablation.json").write_text(json.dumps(to_jsonable(snapshot), indent=1) + "\n")
    write_csv(out / "ablation.csv", _csv_rows(snapshot))
    (out / "ablation.md").write_text(render_ablation_markdown(snapshot))
    (out / "ablation.html").write_text(render_ablation_html(snapshot), encoding="utf-8")


def update_readme(readme: str | Path, markdown: str) -> bool:
    """Replace the README's marked ablation block with ``markdown``; False when the markers are absent."""
    path = Path(readme)
    text = path.read_text()
    pattern = re.compile(re.escape(README_BEGIN.split(" (")[0]) + r"[^\n]*\n.*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        return False
    block = f"{README_BEGIN}\n{markdown.rstrip()}\n{README_END}"
    path.write_text(pattern.sub(lambda _: block, text, count=1))
    return True
