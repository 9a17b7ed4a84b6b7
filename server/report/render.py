"""Self-contained HTML: inline CSS, PNGs as base64 data URIs, no script and no external link."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence

__all__ = ["fmt", "table", "image", "page", "render_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.flag{background:#fde2e2}.ok{background:#e5f6e5}.note{color:#555;font-size:.9em}.skip{color:#a00}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
.kv td{text-align:left}
"""


def fmt(value, digits: int = 3) -> str:
    """A number for a table cell: fixed decimals, an en dash for missing or NaN."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.{digits}f}"
    return html.escape(str(value))


def table(
    headers: Sequence[str], rows: Sequence[Sequence], row_classes: Sequence[str] | None = None, cls: str = ""
) -> str:
    """An HTML table; cells that are not numbers are escaped, numbers go through :func:`fmt`."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        klass = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{klass}>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>")
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def page(title: str, sections: Sequence[tuple[str, str]], subtitle: str = "") -> str:
    """A complete HTML5 document; each section is ``(heading, inner html)``."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f'<p class="note">{html.escape(subtitle)}</p>')
    for heading, inner in sections:
        anchor = "".join(ch if ch.isalnum() else "-" for ch in heading.lower()).strip("-")
        parts.append(f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>{inner}</section>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _site_section(report: dict) -> str:
    labels = report["labels"]
    headers = (
        ["site", "cases"]
        + [f"Dice {n} (95% CI)" for n in labels.values()]
        + ["mean Dice (95% CI)", "tissue Dice GM+WM (95% CI)"]
    )
    headers += [f"HD95 {n} (mm)" for n in labels.values()]
    rows, classes = [], []
    for r in report["sites"]:
        ci = lambda d: f"{fmt(d['mean'])} [{fmt(d['low'])}, {fmt(d['high'])}]"  # noqa: E731
        rows.append(
            [r["site"], r["n_cases"]]
            + [ci(r["dice"][k]) for k in labels]
            + [ci(r["dice"]["mean"]), ci(r["dice"]["tissue"])]
            + [r["hd95"][k] for k in labels]
        )
        classes.append("flag" if r["flagged"] else "ok")
    note = (
        f'<p class="note">Intervals: percentile bootstrap over cases ({report["options"]["n_resamples"]} resamples); '
        "a site with one case has a zero-width interval. Lesion Dice is averaged over cases that contain a lesion. "
        f"Rows in red score below the threshold {fmt(report['fairness']['threshold'], 2)}.</p>"
    )
    return table(headers, rows, classes) + note


def _fairness_section(report: dict, figs: dict[str, bytes]) -> str:
    f, t = report["fairness"], report["fairness_tissue"]
    rows = [
        ["worst site", f["worst_site"] or "–", t["worst_site"] or "–"],
        ["worst Dice", f["worst"], t["worst"]],
        ["best site", f["best_site"] or "–", t["best_site"] or "–"],
        ["best Dice", f["best"], t["best"]],
        ["best − worst gap", f["gap"], t["gap"]],
        ["worst / best ratio", f["ratio"], t["ratio"]],
        ["standard deviation over sites", f["std"], t["std"]],
        ["mean over sites", f["mean"], t["mean"]],
        ["threshold", f["threshold"], t["threshold"]],
        ["flagged sites (below threshold)", ", ".join(f["flagged"]) or "none", ", ".join(t["flagged"]) or "none"],
    ]
    out = table(["across sites", "mean Dice (all labels)", "tissue Dice (GM+WM)"], rows, cls="kv")
    out += (
        '<p class="note">Lesions occur in some cases only, so the all-label mean also reflects each site\'s lesion '
        "count; the tissue column compares sites on labels every case has.</p>"
    )
    if "dice" in figs:
        out += image(figs["dice"], "mean Dice per site with 95% intervals")
    return out


def _invariance_section(report: dict, figs: dict[str, bytes]) -> str:
    inv = report["invariance"]
    if not inv["k"]:
        return '<p class="note">Skipped (k = 0).</p>'
    rows = [
        [site, v["n_maps"], fmt(v["dice_min"], 4), fmt(v["dice_mean"], 4), fmt(v["voxel_agreement_min"], 4)]
        for site, v in inv["sites"].items()
    ]
    out = (
        f"<p>Each test volume was mapped by {inv['k']} random <code>x → s·x + b</code> with s log-uniform in "
        f"[{inv['scale_range'][0]:g}, {inv['scale_range'][1]:g}] and b uniform in [{inv['shift_range'][0]:g}, "
        f"{inv['shift_range'][1]:g}]; the table compares the predicted label maps before and after "
        "(Dice over labels present in either map). Instance norm should give 1.000.</p>"
    )
    out += table(["site", "maps", "min Dice", "mean Dice", "min voxel agreement"], rows)
    out += (
        f"<p><b>Invariance score</b> (mean over all sites and maps): {fmt(inv['score'], 4)}; "
        f"worst single map: {fmt(inv['dice_min'], 4)}.</p>"
    )
    return out


def _stops_section(report: dict, figs: dict[str, bytes]) -> str:
    inv = report["invariance"]
    if not inv["stops"]:
        return '<p class="note">Skipped (no gamma or bias levels).</p>'
    sites = list(inv["sites"])
    headers = ["perturbation", "level"] + sites + ["mean", "min"]
    rows = [
        ["affine s·x+b (reference)", "–"]
        + [inv["sites"][s]["dice_mean"] for s in sites]
        + [inv["dice_mean"], inv["dice_min"]]
    ]
    for s in inv["stops"]:
        name = "gamma curve x^γ" if s["kind"] == "gamma" else "smooth bias field"
        rows.append(
            [name, s["level"]] + [s["sites"][site]["dice_mean"] for site in sites] + [s["dice_mean"], s["dice_min"]]
        )
    out = (
        "<p>Instance norm removes one scale and one offset per feature map. It cannot undo a non-linear "
        "contrast curve or a spatially varying bias field; the agreement below falls as those grow. These "
        "perturbations use <code>shared.scanner</code>, the same code that simulates the hospitals.</p>"
    )
    out += table(headers, rows)
    if "stops" in figs:
        out += image(figs["stops"], "agreement Dice against gamma and bias strength")
    factors = inv.get("factor_sites") or []
    if factors:
        out += (
            f"<p>The study's one-factor sites: each differs from the reference scanner "
            f"({html.escape(factors[0]['reference'])}) in one factor; cost = the reference site's Dice minus this "
            "site's (different subjects, so it includes case-mix noise).</p>"
        )
        out += table(
            ["site", "factor", "Dice", "Dice cost", "tissue Dice", "tissue cost"],
            [[f["site"], f["factor"], f["dice"], f["dice_cost"], f["tissue"], f["tissue_cost"]] for f in factors],
        )
    return out


def _refused_note(history: dict) -> str:
    """Replies the server refused because a node's site name could not be believed (identity check)."""
    items = [
        f"<li>round {r}: {html.escape(str(x['site']))} (node {x.get('node_id')}, {html.escape(str(x['phase']))}): "
        f"{html.escape(str(x['reason']))}</li>"
        for r, refused in zip(history["rounds"], history.get("refused") or [])
        for x in refused
    ]
    if not items:
        return ""
    return f'<p class="flag">Refused replies (site identity):</p><ul class="skip">{"".join(items)}</ul>'


def _ood_section(ood: dict) -> str:
    """The sites' intensity summaries the API compares every upload with, the threshold and its reasoning."""
    out = (
        "<p>Each site summarised its own training volumes (standardised intensity quantiles and block "
        "uniformity, which no scanner <code>s·x + b</code> changes) and shared only aggregates. An upload's "
        f"score is its distance to the nearest site; the API warns above <b>{fmt(ood['threshold'], 2)}</b>: "
        f"{html.escape(str(ood['threshold_rule']))}.</p>"
    )
    out += table(["site", "training volumes summarised"], [[s, v["n"]] for s, v in ood["sites"].items()])
    rows = [
        ["gamma curve x^γ" if s["kind"] == "gamma" else "smooth bias field", s["level"], s["score"],
         "yes" if s["score"] > ood["threshold"] else "no"]
        for s in ood["stops"]
    ]
    if rows:
        out += table(["the sites' own volumes under", "level", "mean score", "warned"], rows)
    return out


def render_report(report: dict, figs: dict[str, bytes]) -> str:
    """The report as one self-contained HTML document."""
    model = report["model"]
    subtitle = (
        f"norm={model.get('norm')}, strategy={model.get('strategy', '?')}, trained on "
        f"{', '.join(model.get('sites') or []) or '?'}; evaluated on held-out imagesTs/labelsTs of "
        f"{report['data_dir']} at {report['created']}"
    )
    sections = [("Sites", _site_section(report)), ("Fairness across sites", _fairness_section(report, figs))]
    if report["skipped"]:
        items = "".join(
            f"<li><b>{html.escape(s['site'])}</b>: {html.escape(s['error'])}</li>" for s in report["skipped"]
        )
        sections.append(("Skipped sites", f'<ul class="skip">{items}</ul>'))
    sections.append(("Invariance certificate", _invariance_section(report, figs)))
    sections.append(("Where instance norm stops", _stops_section(report, figs)))
    if report.get("ood"):
        sections.append(("Out-of-distribution check of uploads", _ood_section(report["ood"])))
    if "histograms" in figs:
        hist_rows = [[s, h["min"], h["p1"], h["median"], h["p99"], h["max"]] for s, h in report["histograms"].items()]
        sections.append(
            (
                "Raw intensities per site",
                image(figs["histograms"], "raw intensity histograms")
                + table(["site", "min", "p1", "median", "p99", "max"], hist_rows, cls=""),
            )
        )
    if "examples" in figs:
        sections.append(
            (
                "Example slices",
                '<p class="note">Orange: grey matter, blue: white matter, red: lesion.</p>'
                + image(figs["examples"], "example slices with predicted masks"),
            )
        )
    if "history" in figs:
        h = report["history"]
        rows = [[s] + list(v) for s, v in h["sites"].items()]
        sections.append(
            (
                "Federated rounds",
                image(figs["history"], "per-site Dice over rounds")
                + table(["site"] + [f"round {r}" for r in h["rounds"]], rows)
                + _refused_note(h),
            )
        )
    elif report.get("history_note"):
        sections.append(("Federated rounds", f'<p class="note">{html.escape(report["history_note"])}</p>'))
    return page(report["title"], sections, subtitle)
