"""Self-contained HTML: inline CSS, PNGs as base64 data URIs, no script and no external link."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence

__all__ = ["fmt", "table", "image", "page"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
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


def table(headers: Sequence[str], rows: Sequence[Sequence], row_classes: Sequence[str] | None = None, cls: str = "") -> str:
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
