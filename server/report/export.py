"""Write a report's numbers out: JSON (NaN as null), CSV of every number, the per-site CSV, and the HTML."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from server.report.render import render_report

__all__ = ["to_jsonable", "flatten_numbers", "write_csv", "write_report"]


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
            writer.writerow(
                {k: "" if (isinstance(v, float) and not math.isfinite(v)) or v is None else v for k, v in row.items()}
            )


def write_report(report: dict, figs: dict[str, bytes], out_dir: str | Path) -> dict[str, Path]:
    """Write report.html, report.json, report.csv and sites.csv into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = to_jsonable(report)
    files = {
        "html": out / "report.html",
        "json": out / "report.json",
        "csv": out / "report.csv",
        "sites_csv": out / "sites.csv",
    }
    files["html"].write_text(render_report(report, figs), encoding="utf-8")
    files["json"].write_text(json.dumps(clean, indent=1) + "\n")
    write_csv(files["csv"], [{"key": k, "value": v} for k, v in flatten_numbers(clean)])
    write_csv(files["sites_csv"], _site_csv_rows(report))
    return files
