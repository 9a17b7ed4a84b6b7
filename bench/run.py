"""Every benchmark in one run: ``python bench/run.py [--quick]`` -> ``bench/results/summary.json``.

Runs, one after the other in their own processes (so one's memory does not weigh on the next):

* ``bench/bench_inference.py``: sliding-window forward vs the compute floor (1 mm brain, large and
  demo models);
* ``bench/bench_api.py``: REST vs the same pipeline in process, the pipeline's fixed costs vs
  nibabel's plain read, REST vs a MONAI bundle pipeline doing the same work;
* ``bench/bench_federation.py``: Flower round vs the same work bare (tiny sites; full run: the demo's
  work too, which ``round_over_bare`` reports), simulation scaling in sites
  (3/10/30/100; ``--quick``: 3/10) with peak RSS of all processes;

* ``bench/bench_soak.py``: the API under 8 concurrent clients mixing good and bad uploads (p95);
* ``bench/bench_native.py`` (full run only): native SuperLink/SuperNode rounds vs the simulation on the
  demo sites of ``data/`` (generated there first when it holds none);

then reads ``compose.json`` (``bench/bench_compose.py``, needs root and Docker: not a step; its date
goes into the README line) where it exists, and writes the figures with the machine's load average
before and after every step. The README's benchmark
table between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is rewritten from ``summary.json``
(``--readme-only`` does just that).

``--quick`` (<= 5 min on an idle 2-core machine): 2 repeats, no concurrency run, 3/10 sites, a
shorter soak, no native run (its figure read from ``bench/results/native.json``), per-benchmark files
in ``bench/results/quick/``; the full run writes them in ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
README = REPO / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# summary key -> (goal as text, test on the value, what it is)
GOALS = {
    "forward_over_floor_1mm": ("<= 2", lambda v: v <= 2.0, "sliding-window forward / compute floor, 1 mm brain, "
                               "channels 16-128, 1 mm grid"),
    "forward_over_floor_demo": ("as low as possible", None, "the same, demo model (channels 8-64, 2 mm grid)"),
    "rest_over_pipeline_1mm": ("<= 1.10", lambda v: v <= 1.10, "REST end to end / the same pipeline in process, "
                               "1 mm upload, demo model"),
    "fixed_over_read_1mm": ("<= 2", lambda v: v <= 2.0, "pipeline minus forward / nibabel read+decompress of "
                            "the upload"),
    "rest_over_monai_pipeline": ("<= 0.6", lambda v: v <= 0.6, "fedmri REST / MONAI bundle pipeline in process "
                                 "(probabilities inverted), same model and volume"),
    "round_over_bare": ("<= 1.10", lambda v: v <= 1.10, "Flower simulation round / the same local work bare, on "
                        "the demo's work (4 demo sites, scripts/demo.sh's recipe; tiny sites where not run: "
                        "`round_over_bare_tiny`)"),
    "sim_sites_max": (">= 100", lambda v: v >= 100, "most simulated hospitals run in one `fedmri federate`"),
    "sim_peak_rss_gib_at_max": ("< 8", lambda v: v < 8.0, "peak RSS of all processes (GiB) at sim_sites_max"),
    "soak_p95_s": ("reported", None, "API soak p95 latency (s), from bench/bench_soak.py"),
    "native_round_over_sim": ("<= 1.5", lambda v: v <= 1.5, "native SuperLink/SuperNode steady round / simulation "
                              "round, same work, from bench/bench_native.py"),
    "compose_round_over_sim": ("<= 1.5", lambda v: v <= 1.5, "the same under docker compose (site containers), "
                               "from bench/bench_compose.py"),
}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def steps(quick: bool, out: Path, scale: str | None = None) -> dict[str, list[str]]:
    py = sys.executable
    q = ["--quick"] if quick else []
    found = {
        "inference": [py, str(BENCH / "bench_inference.py"), "--out", str(out), *q],
        "api": [py, str(BENCH / "bench_api.py"), "--out", str(out), "--configs",
                "default" if quick else "default,bigger", *q],
        "federation": [py, str(BENCH / "bench_federation.py"), "--out", str(out),
                       "--scale", scale or ("3,10" if quick else "3,10,30,100"),
                       "--rounds", "2" if quick else "5", "--epochs", "2" if quick else "8",
                       "--demo-rounds", "0" if quick else "5"],
        "soak": [py, str(BENCH / "bench_soak.py"), "--out", str(out), "--max-seconds", "300",
                 *(["--requests", "96", "--warmup", "16"] if quick else [])],
    }
    if not quick:
        found["native"] = [py, str(BENCH / "bench_native.py"), "--out", str(out / "native"),
                           "--data", str(REPO / "data")]
    return found


def run_step(name: str, command: list[str], timeout: float) -> dict:
    record = {"command": " ".join(command[1:]), "load_average_before": loadavg()}
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        record["returncode"] = proc.returncode
        if proc.returncode != 0:
            record["error"] = (proc.stderr or proc.stdout)[-1500:]
    except subprocess.TimeoutExpired:
        record["returncode"] = None
        record["error"] = f"timed out after {timeout:.0f} s"
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["load_average_after"] = loadavg()
    print(f"{name}: {record['seconds']} s, rc {record['returncode']}, load {record['load_average_before']} -> "
          f"{record['load_average_after']}", flush=True)
    return record


def _model(inference: dict | None, name: str) -> dict | None:
    for m in (inference or {}).get("models", []):
        if m["model"] == name:
            return m
    return None


def _config(api: dict | None, name: str) -> dict | None:
    for c in (api or {}).get("configs", []):
        if c["config"] == name:
            return c
    return None


def _steady_round(run: dict) -> float | None:
    rounds = run.get("round_s") or []
    return rounds[-1] if len(rounds) > 1 else (rounds[0] if rounds else None)


def summarize(out: Path, records: dict | None = None, quick: bool = False, results: Path = RESULTS) -> dict:
    """The summary from the per-benchmark files in ``out`` (soak and native: ``results``'s where ``out`` has
    none, e.g. native in a ``--quick`` run; compose: always ``results``'s)."""
    inference, api, federation = (_read(out / f"{n}.json") for n in ("inference", "api", "federation"))
    values: dict[str, float | int | None] = dict.fromkeys(GOALS)
    extra: dict = {}
    files = {name: _read(out / f"{name}.json") for name in ("soak", "native")}
    for name in ("soak", "native", "compose"):
        if files.get(name) is None:  # not measured by this invocation (compose never is): the older file, dated
            files[name] = _read(results / f"{name}.json")
            if files[name] is not None:
                extra[f"{name}_measured"] = files[name].get("when") or files[name].get("date")
    soak, native, compose = files["soak"], files["native"], files["compose"]
    large, demo = _model(inference, "large_1mm"), _model(inference, "demo")
    if large:
        values["forward_over_floor_1mm"] = large["forward_over_floor"]
        extra.update(monai_over_floor_1mm=large["monai_over_floor"], overlap_share_1mm=large["overlap_share"],
                     inference_variant_1mm=large["best_same_prediction"])
    if demo:
        values["forward_over_floor_demo"] = demo["forward_over_floor"]
        extra.update(monai_over_floor_demo=demo["monai_over_floor"], overlap_share_demo=demo["overlap_share"],
                     inference_variant_demo=demo["best_same_prediction"])
    if inference:
        extra["dense_conv_gflops"] = inference.get("dense_conv_gflops")
        extra["invariance_label_agreement"] = inference.get("invariance_label_agreement")
    default = _config(api, "default")
    if default:
        values["rest_over_pipeline_1mm"] = default["ratio_rest_vs_inprocess_pipeline"]
        values["fixed_over_read_1mm"] = default.get("ratio_fixed_vs_read")
        values["rest_over_monai_pipeline"] = default.get("ratio_rest_vs_monai_bundle")
        extra["api_median_seconds_demo"] = default["median_seconds"]
    if federation:
        # The demo's work where it was run (the full run), else the tiny sites' (--quick): the product's round,
        # not a ~1 s toy round where Flower's per-round cost looms largest; both stay in the details.
        demo_work = federation.get("overhead_demo")
        values["round_over_bare"] = round((demo_work or federation["overhead"])["ratio"], 3)
        extra["round_over_bare_tiny"] = round(federation["overhead"]["ratio"], 3)
        for key, o in (("tiny", federation["overhead"]), ("demo", demo_work)):
            if o and "overhead_per_round_s" in o:
                extra[f"flower_overhead_per_round_s_{key}"] = o["overhead_per_round_s"]
        scaling = federation.get("scaling", [])
        if scaling:
            top = max(scaling, key=lambda r: r["n_sites"])
            values["sim_sites_max"] = top["n_sites"]
            values["sim_peak_rss_gib_at_max"] = round(top["peak_rss_mb"] / 1024, 2)
            extra["sim_steady_round_s_by_sites"] = {str(r["n_sites"]): _steady_round(r) for r in scaling}
            extra["sim_peak_rss_gib_by_sites"] = {str(r["n_sites"]): round(r["peak_rss_mb"] / 1024, 2)
                                                  for r in scaling}
    if soak and "soak_p95_s" in soak:
        values["soak_p95_s"] = soak["soak_p95_s"]
    if native:
        values["native_round_over_sim"] = native.get("native_round_over_sim")
    if compose:
        values["compose_round_over_sim"] = compose.get("compose_round_over_sim")
    goals = {}
    for key, (goal, test, what) in GOALS.items():
        value = values[key]
        met = None if value is None or test is None else bool(test(value))
        goals[key] = {"value": value, "goal": goal, "met": met, "what": what}
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": quick,
        "cpus": os.cpu_count(),
        **values,
        "goals": goals,
        "details": extra,
        "steps": records or {},
    }


def readme_block(summary: dict) -> str:
    """The README's benchmark table (markdown) from a summary."""
    when = summary["date"] + (" (--quick)" if summary.get("quick") else "") + f", {summary['cpus']} CPUs"
    steps = summary.get("steps", {})
    load = ", ".join(f"{name} {s['load_average_before'][0]:.1f}->{s['load_average_after'][0]:.1f}"
                     for name, s in steps.items()) or "n/a"
    earlier = [name for name, s in steps.items() if s.get("from_earlier_invocation")]
    if earlier:  # `--only`: say which figures this date does not cover
        when += f"; {', '.join(earlier)} from an earlier invocation (dates in their files)"
    older = [f"{name} at {date}" for name in ("soak", "native", "compose")  # compose needs root and Docker
             if (date := summary.get("details", {}).get(f"{name}_measured"))]
    if older:
        when += f"; read from earlier files: {', '.join(older)}"
    lines = [
        START,
        f"Generated by `python bench/run.py` from `bench/results/summary.json` ({when}; "
        f"1-min load average before->after each step: {load}).",
        "",
        "| figure | measured | goal | met? | what |",
        "|---|---|---|---|---|",
    ]
    for key, g in summary["goals"].items():
        value = "not measured" if g["value"] is None else f"{g['value']:g}" if isinstance(g["value"], float) \
            else str(g["value"])
        met = {True: "**met**", False: "**missed**", None: "-"}[g["met"]]
        lines.append(f"| `{key}` | {value} | {g['goal']} | {met} | {g['what']} |")
    lines.append(END)
    return "\n".join(lines)


def update_readme(summary: dict, path: Path = README) -> bool:
    """Rewrite the marked block of ``path``; returns False (and leaves the file) when it has no markers."""
    text = path.read_text()
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + readme_block(summary) + tail)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="<= 5 min: fewer repeats, 3/10 sites")
    parser.add_argument("--only", default="",
                        help="comma-separated steps to run (inference,api,federation,soak,native)")
    parser.add_argument("--scale", default=None, help="site counts of the simulation scaling (default 3,10 quick, "
                        "else 3,10,30,100)")
    parser.add_argument("--readme-only", action="store_true", help="rewrite the README block from summary.json")
    args = parser.parse_args()
    if args.readme_only:
        summary = _read(RESULTS / "summary.json")
        if summary is None:
            print("no bench/results/summary.json yet", file=sys.stderr)
            return 1
        print("README updated" if update_readme(summary) else "README has no bench markers")
        return 0
    out = RESULTS / "quick" if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    wanted = {s for s in args.only.split(",") if s}
    before = loadavg()
    records = {}
    budget = {"inference": 900, "api": 900, "federation": 900, "soak": 600} if args.quick else \
        {"inference": 1200, "api": 1200, "federation": 3600, "soak": 600, "native": 1200}
    if args.scale:  # more sites than the default: give the simulation the time it needs
        budget["federation"] = max(budget["federation"], 2400)
    for name, command in steps(args.quick, out, args.scale).items():
        if not wanted or name in wanted:
            records[name] = run_step(name, command, budget[name])
    previous = (_read(RESULTS / "summary.json") or {}).get("steps", {})
    for name in steps(args.quick, out):  # steps not run now: their files are older, say so
        if name not in records and name in previous:
            records[name] = {**previous[name], "from_earlier_invocation": True}
    summary = summarize(out, records, args.quick)
    summary["load_average_before"], summary["load_average_after"] = before, loadavg()
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    update_readme(summary)
    for key, g in summary["goals"].items():
        print(f"{key}: {g['value']} (goal {g['goal']}, met: {g['met']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
