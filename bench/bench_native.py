"""Native (deployment) mode against the simulation on the same work, and where a native message's time goes.

Runs the demo sites (``data/``, 4 hospitals) for ``--rounds`` rounds x ``--local-epochs`` in both
modes through ``server.federation.run_federation`` (real flower-superlink / flower-supernode
processes in native mode), native first with every site's disk cache emptied, so its round 1
pays the cache build as a first deployment does. Per round: the ServerApp's round time from the
run log. Per native message (site x round): the ClientApp's own marks (``client/timing.py``) and
the ServerApp's send/arrival times (``server/federation/polling.py``), split into

    dispatch     sent -> ClientApp process started (SuperNode's pull loop: 0.2 s in fedmri supernode, 3 s
                 idle in Flower's; SuperExec poll; fork from the warm zygote, shared/superexec.py)
    startup      process start -> client.app begins importing (flwr-clientapp pulls the message, waiting
                 while its SuperNode downloads the model, and unpacks the FAB)
    import       client.app's own imports (thin: flwr, client.worker; torch/MONAI/shared only in the
                 process that does the work: the worker, or the ClientApp itself with warm-worker=false)
    flower_in    imports done -> handler entered (message and context pulled from the SuperNode)
    handoff      the thin ClientApp hands the message to the site's warm worker (client/worker.py) and
                 gets the reply back: connect (or start the worker, with its imports), send, receive
    data         run config, site data (split, disk cache -> loader), network built, weights loaded
                 (MONAI's import happens here, on first use; a warm worker keeps loader and imports)
    eval         evaluation of the received model (eval-with-train) or of the evaluate message
    train        local epochs
    serialize    state dict -> ArrayRecord
    reply        handler returned -> reply at the ServerApp (Flower serialisation, push, polls)

``native_round_over_sim`` = steady native round / steady simulation round (rounds 3..N-1, mean, the
same rounds in both modes; see ``summarize``); goal <= 1.5.
Also ``python -X importtime -c "import client.app; import client.task"``.
Each native message also reports which process did its work (``worker_pid``, ``worker_started``,
``worker_fallback``); ``--set warm-worker=false`` measures the fresh-process-per-message path.
Results: bench/results/native.{json,md}.
Run: .venv/bin/python bench/bench_native.py [--rounds 6] [--local-epochs 1] [--data data]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.federation import run_federation  # noqa: E402
from shared.cache import DEFAULT_CACHE_NAME  # noqa: E402
from shared.runlog import read_run_log  # noqa: E402

PHASES = ("dispatch", "startup", "import", "flower_in", "handoff", "data", "eval", "train", "serialize", "reply")


def first_round_records(log_path: Path) -> dict[int, dict]:
    """Each round's first record (its timing), with the evaluation of its latest record (eval-with-train)."""
    out: dict[int, dict] = {}
    for rec in read_run_log(log_path):
        if rec.get("event") != "round":
            continue
        if rec["round"] in out:
            for site, info in rec["sites"].items():
                if "eval" in info:
                    out[rec["round"]]["sites"].setdefault(site, {})["eval"] = info["eval"]
        else:
            out[rec["round"]] = rec
    return out


def breakdown(metrics: dict, extra_eval: dict | None = None) -> dict[str, float] | None:
    """One message's phases (seconds) from the ClientApp's marks and the ServerApp's send/arrival times."""
    need = ("time_sent", "time_arrived", "time_process_start", "time_reply")
    if not all(isinstance(metrics.get(k), (int, float)) for k in need):
        return None
    parts = {
        "dispatch": metrics["time_process_start"] - metrics["time_sent"],
        "startup": metrics.get("time_startup", 0.0),
        "import": metrics.get("time_import", 0.0),
        "flower_in": metrics.get("time_before_handler", 0.0),
        "handoff": metrics.get("time_handoff", 0.0),
        "data": metrics.get("time_data", 0.0),
        "eval": metrics.get("time_eval", 0.0),
        "train": metrics.get("time_train", 0.0),
        "serialize": metrics.get("time_serialize", 0.0),
        "reply": metrics["time_arrived"] - metrics["time_reply"],
    }
    parts["total"] = metrics["time_arrived"] - metrics["time_sent"]
    return {k: round(v, 3) for k, v in parts.items()}


def run_mode(mode: str, data: Path, work: Path, run_config: dict) -> dict:
    out = work / mode
    start = time.perf_counter()
    result = run_federation(data, out, mode=mode, run_name=f"bench-{mode}", run_config=run_config, timeout=3600)
    wall = time.perf_counter() - start
    rounds = first_round_records(result.log_path)
    seconds = [rounds[k]["seconds"] for k in sorted(rounds)]
    messages = []
    for k in sorted(rounds):
        for site, info in sorted(rounds[k]["sites"].items()):
            for phase in ("train", "eval"):
                parts = breakdown(info.get(phase, {}))
                if parts is not None:
                    cache = {c: info[phase].get(c) for c in ("cache_hits", "cache_built", "worker_pid",
                                                             "worker_started", "worker_fallback")}
                    messages.append({"round": k, "site": site, "message": phase, **parts, **cache})
    last = rounds[max(rounds)]["sites"]
    dice = {site: info.get("eval", {}).get("dice_mean") for site, info in last.items()}
    return {"mode": mode, "wall_s": round(wall, 2), "round_s": seconds, "messages": messages, "final_dice": dice,
            "eval_per_round": {k: {s: i.get("eval", {}).get("dice_mean") for s, i in rounds[k]["sites"].items()}
                               for k in sorted(rounds)}}


def import_times() -> dict[str, float]:
    """Cumulative import time (s) of client.app and its biggest parts, and of MONAI (imported per message)."""
    code = "import client.app; import client.task; import monai.networks.nets"
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    top: dict[str, float] = {}
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( +)(\S+)$", line)
        if m and len(m.group(2)) <= 3:  # top-level and first-level modules
            top[m.group(3)] = max(top.get(m.group(3), 0.0), int(m.group(1)) / 1e6)
    keep = ["client.app", "client.worker", "client.task", "torch", "flwr.app", "flwr.clientapp", "numpy",
            "shared.runconfig", "shared.data", "shared.training", "shared.model", "shared.cache", "monai.networks.nets",
            "monai"]
    return {k: round(top[k], 3) for k in keep if k in top}


def steady_rounds(rounds: int) -> list[int]:
    """Rounds 3..N-1, where neither mode does anything for the first time. Round 1 builds the training
    caches and warms up; with eval-with-train a native site evaluates for the first time in round 2 (its
    validation cache is built then; the simulation did that in round 1); the last round also sends the
    run's one separate evaluate message. Fewer rounds: 2..N-1, or the last one."""
    return list(range(3, rounds)) or list(range(2, rounds)) or [rounds]


def summarize(sim: dict, native: dict, rounds: int) -> dict:
    middle = steady_rounds(rounds)
    sim_steady = statistics.mean(sim["round_s"][k - 1] for k in middle)
    native_steady = statistics.mean(native["round_s"][k - 1] for k in middle)
    msgs = [m for m in native["messages"] if m["round"] in middle]
    mean_parts = {p: round(statistics.mean(m[p] for m in msgs), 3) for p in (*PHASES, "total")} if msgs else {}
    first = [m for m in native["messages"] if m["round"] == 1]
    return {
        "native_round_over_sim": round(native_steady / sim_steady, 3),
        "goal": 1.5,
        "goal_met": native_steady / sim_steady <= 1.5,
        "sim_steady_round_s": round(sim_steady, 2),
        "native_steady_round_s": round(native_steady, 2),
        "native_first_round_s": native["round_s"][0],
        "native_first_round_extra_s": round(native["round_s"][0] - native_steady, 2),
        "native_second_round_extra_s": round(native["round_s"][1] - native_steady, 2) if rounds > 1 else None,
        "native_last_round_s": native["round_s"][-1],
        "steady_rounds": middle,
        "sim_first_round_s": sim["round_s"][0],
        "native_steady_message_mean_s": mean_parts,
        "native_first_round_message_mean_s": {p: round(statistics.mean(m[p] for m in first), 3)
                                              for p in (*PHASES, "total")} if first else {},
    }


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        "# Native (deployment) mode vs simulation, and a native message's time",
        "",
        f"`bench/bench_native.py`, {result['when']}, {result['machine']}; load average before "
        f"{result['loadavg_before']}, after {result['loadavg_after']} (a shared machine: absolute times are inflated).",
        f"Work: the {len(result['sites'])} demo sites ({', '.join(result['sites'])}), {result['rounds']} rounds x "
        f"{result['local_epochs']} local epoch, run config {json.dumps(result['run_config'])}; eval-with-train "
        f"{result['eval_with_train']} (auto: evaluation rides on the next round's train message in native mode, "
        "separate evaluate messages in the simulation, whose warm actors make them cheap). Each native site's "
        "ClientApp gets an equal share of the cores as torch threads (node config cpus).",
        "",
        "| | simulation | native |",
        "|---|---|---|",
        f"| round times (s) | {', '.join(f'{x:.1f}' for x in result['simulation']['round_s'])} | "
        f"{', '.join(f'{x:.1f}' for x in result['native']['round_s'])} |",
        f"| steady round (rounds {s['steady_rounds']}, mean) | {s['sim_steady_round_s']} s | "
        f"{s['native_steady_round_s']} s |",
        f"| whole run (start-up included) | {result['simulation']['wall_s']} s | {result['native']['wall_s']} s |",
        "",
        f"**native_round_over_sim = {s['native_round_over_sim']}** (goal <= {s['goal']}: "
        f"{'met' if s['goal_met'] else 'NOT met'}). Native first round {s['native_first_round_s']} s, "
        f"{s['native_first_round_extra_s']} s more than a steady one ("
        + ("site caches kept from an earlier run, so round 1 built none; on a loaded machine the load changes more "
           "between rounds than this" if result.get("keep_cache") else "every site cache built in round 1")
        + ")"
        + (f"; round 2 {s['native_second_round_extra_s']} s more (eval-with-train: each site's first evaluation, "
           "which builds its validation cache)" if s.get("native_second_round_extra_s") is not None else "")
        + f"; last round {s['native_last_round_s']} s (eval-with-train: the run's one separate evaluate message).",
        "",
        "## Where a native message's time goes (mean over sites, seconds)",
        "",
        "| phase | what | first round | steady rounds |",
        "|---|---|---|---|",
    ]
    what = {
        "dispatch": "sent -> ClientApp process started (SuperNode poll 0.2 s, SuperExec poll, fork)",
        "startup": "process start -> client.app imports (message pulled while the SuperNode downloads it, FAB)",
        "import": "client.app imports (thin: flwr, client.worker; the work's imports: worker or fallback)",
        "handoff": "thin ClientApp -> site worker -> back (connect or start the worker, send, receive)",
        "flower_in": "message + context pulled by Flower before the handler",
        "data": "config, site split, cached volumes -> loader, network (MONAI import), weights",
        "eval": "evaluation of the received model (eval-with-train)",
        "train": "local epoch(s)",
        "serialize": "state dict -> ArrayRecord",
        "reply": "reply -> ServerApp (Flower push + polls)",
        "total": "sent -> reply arrived",
    }
    f, st = s["native_first_round_message_mean_s"], s["native_steady_message_mean_s"]
    for p in (*PHASES, "total"):
        lines.append(f"| {p} | {what[p]} | {f.get(p, '-')} | {st.get(p, '-')} |")
    lines += ["", "Per message (native):", "",
              "| round | site | message | " + " | ".join(PHASES) + " | total | cache hits/built | worker pid "
              "(started, fallback) |",
              "|" + "---|" * (len(PHASES) + 6)]
    for m in result["native"]["messages"]:
        lines.append(f"| {m['round']} | {m['site']} | {m['message']} | " + " | ".join(f"{m[p]:.2f}" for p in PHASES)
                     + f" | {m['total']:.2f} | {m.get('cache_hits')}/{m.get('cache_built')} | "
                     + (f"{m['worker_pid']} ({m.get('worker_started')}, {m.get('worker_fallback')})"
                        if m.get("worker_pid") is not None else "-") + " |")
    lines += ["", "`python -X importtime -c \"import client.app; import client.task; import monai.networks.nets\"` "
              "(cumulative, s; the thin ClientApp process imports client.app only):", "",
              "| module | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["import_times"].items()]
    lines += ["", "Final-round Dice (mean over labels) per site, same in both modes up to float noise:", "",
              "| site | simulation | native |", "|---|---|---|"]
    for site in sorted(result["native"]["final_dice"]):
        a, b = result["simulation"]["final_dice"].get(site), result["native"]["final_dice"].get(site)
        lines.append(f"| {site} | {a if a is None else round(a, 4)} | {b if b is None else round(b, 4)} |")
    return "\n".join(lines) + "\n"


def demo_sites(data: Path) -> list[str]:
    """The site folders under ``data``; the demo hospitals are generated there first (as ``fedmri generate
    --out data`` writes them) when it holds none, so ``bench/run.py`` runs on a fresh checkout."""
    from shared.synth import generate_sites

    if not any((p / "imagesTr").is_dir() for p in data.glob("*")):  # glob: nothing when data does not exist
        generate_sites(data)
    return sorted(p.name for p in data.iterdir() if (p / "imagesTr").is_dir())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="The issue's work: 4 demo sites, --local-epochs 1 (the default), 6 rounds (rounds 3-5 are steady). "
        "Smaller: --set max-steps=3. The fresh-process path: --set warm-worker=false.",
    )
    parser.add_argument("--data", default=str(ROOT / "data"),
                        help="demo sites (fedmri generate; written there first when the folder holds none)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per mode (>= 4: rounds 3..N-1 are steady)")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="extra run-config KEY=VALUE (TOML value)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "native"), help="results stem (.json/.md)")
    parser.add_argument("--keep-cache", action="store_true", help="do not empty the site caches first")
    args = parser.parse_args()
    import tomllib

    data = Path(args.data).resolve()
    sites = demo_sites(data)
    run_config = {"num-server-rounds": args.rounds, "local-epochs": args.local_epochs}
    for item in args.set:
        run_config.update(tomllib.loads(item))
    if not args.keep_cache:
        for site in sites:
            shutil.rmtree(data / site / DEFAULT_CACHE_NAME, ignore_errors=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="bench-native-"))
    try:
        native = run_mode("native", data, work, run_config)
        sim = run_mode("simulation", data, work, run_config)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    imports = import_times()
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "sites": sites, "rounds": args.rounds, "local_epochs": args.local_epochs, "run_config": run_config,
        "eval_with_train": run_config.get("eval-with-train", "auto"), "keep_cache": args.keep_cache,
        "summary": summarize(sim, native, args.rounds),
        "simulation": sim, "native": native, "import_times": imports,
    }
    for key in ("native_round_over_sim", "native_first_round_extra_s"):  # top level: bench/run.py reads them
        result[key] = result["summary"][key]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
