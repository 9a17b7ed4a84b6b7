"""The demo, timed and scored: ``scripts/demo.sh`` on fresh folders, without serving -> bench/results/demo.{json,md}.

Runs exactly what a new user runs (generate -> federate -> report), in a temporary folder
(``FEDMRI_DATA``, ``FEDMRI_RUNS``, ``FEDMRI_SERVE=0``), times it end to end and per phase (from the
moments its output reaches each step), and scores the served model on every site's held-out test
cases from the report it wrote (metrics on each case's own label grid). Checks the model-quality
goals: the whole demo <= 10 min; tissue Dice (mean of GM and WM) >= 0.90 at every site; lesion Dice
>= 0.5 over the cases with a lesion; no site flagged. The load average is recorded before and after.

Run: .venv/bin/python bench/bench_demo.py  (~6.5 min on an idle 2-core machine)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
START, END = "<!-- demo:start -->", "<!-- demo:end -->"  # README block regenerated from demo.md
GOALS = {"demo_seconds": 600.0, "tissue_dice_min": 0.90, "lesion_dice": 0.5}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def score(report: dict) -> dict:
    """Per site and overall test-case scores from a fedmri report.json."""
    sites, lesion_cases = {}, []
    for site in report["sites"]:
        cases = site["cases"]
        gm, wm = _mean(c["dice"].get("1") for c in cases), _mean(c["dice"].get("2") for c in cases)
        with_lesion = [c for c in cases if c["lesion"]["ref_lesions"] > 0]
        lesion_free = [c for c in cases if c["lesion"]["ref_lesions"] == 0]
        lesion_cases += [c["dice"].get("3") for c in with_lesion]
        ref = sum(c["lesion"]["ref_lesions"] for c in cases)
        pred = sum(c["lesion"]["pred_lesions"] for c in cases)
        detected = sum(c["lesion"]["detected"] for c in cases)
        true_pred = sum(c["lesion"]["true_pred"] for c in cases)
        precision = true_pred / pred if pred else None
        recall = detected / ref if ref else None
        f1 = (2 * precision * recall / (precision + recall) if precision is not None and recall is not None
              and precision + recall > 0 else (0.0 if precision is not None and recall is not None else None))
        sites[site["site"]] = {
            "cases": len(cases),
            "gm": gm,
            "wm": wm,
            "tissue": _mean([gm, wm]),
            "lesion_dice": _mean(c["dice"].get("3") for c in with_lesion),
            "lesion_cases": len(with_lesion),
            "lesion_precision": precision,
            "lesion_recall": recall,
            "lesion_f1": f1,
            "fp_lesion_ml_lesion_free": _mean(c["lesion"]["fp_volume_ml"] for c in lesion_free),
            "lesion_free_cases": len(lesion_free),
            "mean_dice": site["dice"]["mean"]["mean"],
            "flagged": bool(site["flagged"]),
        }
    return {"sites": sites, "lesion_dice": _mean(lesion_cases), "lesion_cases": len(lesion_cases),
            "flagged": sorted(s for s, v in sites.items() if v["flagged"])}


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def render(result: dict) -> str:
    s, g = result["scores"], result["goals"]
    lines = [
        "# The demo, timed and scored",
        "",
        f"`bench/bench_demo.py`, {result['date']}, {result['cpus']} cores; load average before "
        f"{result['load_before']}, after {result['load_after']}. `scripts/demo.sh` on fresh folders (no serve): "
        f"**{result['seconds']:.0f} s** in all (generate {result['phases'].get('generate', float('nan')):.0f} s, "
        f"federate {result['phases'].get('federate', float('nan')):.0f} s, report "
        f"{result['phases'].get('report', float('nan')):.0f} s). Served model `{result['model']}`.",
        "",
        "Held-out test cases (`imagesTs/`), metrics on each case's own label grid:",
        "",
        "| site | GM | WM | tissue | lesion Dice (cases with a lesion) | lesion detection P / R / F1 "
        "| FP lesion mL on lesion-free cases | site mean Dice | flagged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in s["sites"].items():
        lines.append(
            f"| {name} | {_fmt(v['gm'])} | {_fmt(v['wm'])} | **{_fmt(v['tissue'])}** | {_fmt(v['lesion_dice'])} "
            f"(n={v['lesion_cases']}) | {_fmt(v['lesion_precision'], 2)} / {_fmt(v['lesion_recall'], 2)} / "
            f"{_fmt(v['lesion_f1'], 2)} | {_fmt(v['fp_lesion_ml_lesion_free'], 2)} (n={v['lesion_free_cases']}) | "
            f"{_fmt(v['mean_dice'])} | {'yes' if v['flagged'] else 'no'} |"
        )
    lines += [
        f"| **all** | | | | **{_fmt(s['lesion_dice'])}** (n={s['lesion_cases']}) | | | | "
        f"flagged: {', '.join(s['flagged']) or 'none'} |",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    for key, (goal, value, met) in g.items():
        lines.append(f"| {key} {goal} | {value} | {'yes' if met else '**no**'} |")
    return "\n".join(lines) + "\n"


def goals(result: dict) -> dict:
    s = result["scores"]
    tissue = [v["tissue"] for v in s["sites"].values()]
    worst = min((t for t in tissue if t is not None), default=None)
    return {
        "demo time": ("<= 600 s", f"{result['seconds']:.0f} s", result["seconds"] <= GOALS["demo_seconds"]),
        "tissue Dice at every site": (">= 0.90", f"worst {_fmt(worst)}",
                                      worst is not None and worst >= GOALS["tissue_dice_min"]),
        "lesion Dice (cases with a lesion)": (
            ">= 0.5", _fmt(s["lesion_dice"]), s["lesion_dice"] is not None and s["lesion_dice"] >= GOALS["lesion_dice"]
        ),
        "sites flagged": ("none", ", ".join(s["flagged"]) or "none", not s["flagged"]),
    }


def update_readme(markdown: str, path: Path = README) -> bool:
    """Replace the README's demo block (between START and END) with ``markdown`` minus its title."""
    text = path.read_text()
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    body = markdown.split("\n", 2)[2] if markdown.startswith("# ") else markdown
    path.write_text(f"{head}{START}\n{body.strip()}\n{END}{rest.split(END, 1)[1]}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="writes demo.json and demo.md here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data and runs folders")
    parser.add_argument("--readme-only", action="store_true", help="only rewrite the README block from demo.md")
    args = parser.parse_args()
    if args.readme_only:
        return 0 if update_readme((Path(args.out) / "demo.md").read_text()) else 1
    work = Path(tempfile.mkdtemp(prefix="fedmri-demo-"))
    env = {**os.environ, "FEDMRI_DATA": str(work / "data"), "FEDMRI_RUNS": str(work / "runs"), "FEDMRI_SERVE": "0"}
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    marks: dict[str, float] = {}
    log_path = work / "demo.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(["bash", "scripts/demo.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            now = time.perf_counter() - start
            if line.startswith("federation ") and "generate" not in marks:
                marks["generate"] = now
            elif line.startswith("model ") and "federate" not in marks:
                marks["federate"] = now
        rc = proc.wait()
    seconds = time.perf_counter() - start
    if rc != 0:
        print(log_path.read_text()[-3000:])
        raise SystemExit(f"scripts/demo.sh failed (exit {rc}); log: {log_path}")
    reports = sorted((work / "runs" / "reports").glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    report = json.loads(reports[-1].read_text())
    phases = {"generate": marks.get("generate", float("nan")),
              "federate": marks.get("federate", float("nan")) - marks.get("generate", float("nan")),
              "report": seconds - marks.get("federate", float("nan"))}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(seconds, 1),
        "phases": {k: round(v, 1) for k, v in phases.items()},
        "model": report["model"]["version"],
        "scores": score(report),
    }
    result["goals"] = goals(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "demo.md").write_text(render(result))
    print(render(result))
    update_readme(render(result))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
