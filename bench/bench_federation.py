"""Federation benchmark, measured in one run on this machine.

1. Flower overhead: a federated round (Simulation Engine: 3 sites train ``local-epochs`` and
   evaluate, the server aggregates and checkpoints) vs the same per-site work done bare in plain
   worker processes (build the network, load the global weights, train the same epochs, evaluate), both
   after warm-up (data cached). Both run 2 sites at a time in one-thread processes (the simulation's
   2 one-CPU clients on 2 cores). Ratio = federated round / bare round; goal <= 1.10.
   With ``--demo-rounds N`` the same comparison runs again on the demo's own work: the 4 demo sites
   (``fedmri generate``, 2 mm) and ``scripts/demo.sh``'s federate flags (read from the script with the
   CLI's parser), N rounds: Flower's share of a real round.
2. Scaling: simulation with 3, 10 and 30 sites (virtual SuperNodes; sites beyond the three real
   tiny ones are links to them): wall time of the whole ``run_federation`` call and peak memory
   (sum of RSS over every process of the federation: SuperLink, simulation runtime, Ray workers).

Data: the test suite's three 4 mm sites (regenerated here). Results: bench/results/federation.{json,md}.
Run: .venv/bin/python bench/bench_federation.py [--epochs 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from server.federation import run_federation
from shared.data import make_train_loader
from shared.model import build_unet
from shared.runconfig import RunConfig
from shared.scanner import ScannerProfile
from shared.synth import DEMO_SITES, SiteSpec, generate_sites
from shared.training import evaluate, load_site, train_epochs

ROOT = Path(__file__).resolve().parents[1]

SPACING = (4.0, 4.0, 4.0)
SITES = (  # same scanners as tests/conftest.py, a few more cases
    SiteSpec("site-a", ScannerProfile(scale=1.0, shift=0.0, spacing=SPACING), n_train=4, n_test=0),
    SiteSpec("site-b", ScannerProfile(scale=4.0, shift=-300.0, spacing=SPACING), n_train=4, n_test=0),
    SiteSpec(
        "site-c",
        ScannerProfile(scale=0.25, shift=500.0, gamma=0.7, bias_strength=0.2, noise_std=0.01, spacing=SPACING),
        n_train=3,
        n_test=0,
    ),
)
BASE_CONFIG = {
    "roi-size": "32,32,32",
    "spacing": "4,4,4",
    "channels": "8,16,32",
    "samples-per-volume": 2,
    "min-sites": 2,
}


class MemorySampler:
    """Peak of the summed RSS of a federation's processes (found through its private FLWR_HOME)."""

    def __init__(self) -> None:
        self.federation = None
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def attach(self, federation) -> None:
        self.federation = federation
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self.federation.leftover_pids():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
                except OSError:
                    continue
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


_WORKER_SITES: dict = {}
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _init_worker(site_dirs: list[str], run_config: dict) -> None:
    """One thread like a simulated client (Ray num-cpus=1); every site's data cached up front, so no
    round pays for loading a site this worker has not served yet."""
    torch.set_num_threads(1)
    data_cfg = RunConfig.from_run_config(run_config).data_config()
    for site_dir in site_dirs:
        split = load_site(site_dir, data_cfg, seed=0)
        _WORKER_SITES[site_dir] = (split, make_train_loader(split.train, data_cfg, seed=0))


def _site_round(task: tuple) -> tuple[int, dict]:
    """One site's round without Flower: build, load the global weights, train, evaluate."""
    site_dir, run_config, state = task
    cfg = RunConfig.from_run_config(run_config)
    data_cfg = cfg.data_config()
    if site_dir not in _WORKER_SITES:  # cached per worker process, like a simulation actor
        split = load_site(site_dir, data_cfg, seed=cfg.seed)
        _WORKER_SITES[site_dir] = (split, make_train_loader(split.train, data_cfg, seed=cfg.seed))
    split, loader = _WORKER_SITES[site_dir]
    torch.manual_seed(cfg.seed)
    model = build_unet(cfg.network_config())
    model.load_state_dict(state)
    train_epochs(model, loader, epochs=cfg.local_epochs, lr=cfg.lr, max_steps=cfg.max_steps or None)
    evaluate(model, split.val or split.train, data_cfg)
    return len(split.train), model.state_dict()


def demo_federate_words() -> list[str]:
    """``scripts/demo.sh``'s ``fedmri federate`` command as words (``$data``, ``$runs``, ``$run`` -> ``x``)."""
    text = (ROOT / "scripts" / "demo.sh").read_text()
    command = re.search(r"^fedmri federate .*?(?<!\\)\n", text, re.M | re.S).group(0)
    words = shlex.split(re.sub(r"#[^\n]*", "", command).replace("\\\n", " "))
    return [re.sub(r"\$\{?\w+\}?", "x", w) for w in words]  # where, not what


def demo_recipe() -> dict:
    """``scripts/demo.sh``'s ``fedmri federate`` flags as a run config, parsed by the real CLI parser."""
    from server.cli import build_parser
    from server.commands.options import run_config_from_args

    return run_config_from_args(build_parser().parse_args(demo_federate_words()[1:]))


def overhead_ratio(data: Path, site_dirs: list[str], run_config: dict, name: str) -> dict:
    """Federated steady rounds (the first is warm-up) against the same rounds bare."""
    fed = federated(data, data.parent / "runs", run_config, name)
    fed_steady = fed["round_s"][1:]  # round 1 includes Ray start-up and data caching
    bare = bare_rounds(site_dirs, run_config, run_config["num-server-rounds"] - 1)
    fed_median, bare_median = statistics.median(fed_steady), statistics.median(bare)
    return {
        "rounds": run_config["num-server-rounds"],
        "sites": len(site_dirs),
        "federated_round_s": fed_steady,
        "bare_round_s": bare,
        "federated_first_round_s": fed["round_s"][0],
        "federated_wall_s": fed["wall_s"],
        "overhead_per_round_s": round(fed_median - bare_median, 3),
        "ratio": fed_median / bare_median,
        "goal": 1.10,
    }


def bare_rounds(site_dirs: list[str], run_config: dict, rounds: int, workers: int = 2) -> list[float]:
    """The federated work without Flower: per round every site trains and evaluates, ``workers`` at a
    time in one-thread processes (the simulation's 2 one-CPU clients), then a weighted average."""
    cfg = RunConfig.from_run_config(run_config)
    torch.manual_seed(cfg.seed)
    global_state = build_unet(cfg.network_config()).state_dict()
    times = []
    ctx = multiprocessing.get_context("spawn")
    # Ray starts each one-CPU client with these set before torch/numpy load; do the same.
    saved = {k: os.environ.get(k) for k in _ONE_THREAD}
    os.environ.update(_ONE_THREAD)
    try:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(site_dirs, run_config))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with pool:
        for rnd in range(rounds + 1):  # round 0 warms up (imports, data caching), like federated round 1
            start = time.perf_counter()
            states = pool.map(_site_round, [(d, run_config, global_state) for d in site_dirs], chunksize=1)
            total = sum(n for n, _ in states)
            global_state = {
                k: sum(s[k].float() * (n / total) for n, s in states).to(v.dtype) for k, v in global_state.items()
            }
            if rnd > 0:
                times.append(time.perf_counter() - start)
    return times


def federated(data_dir: Path, out: Path, run_config: dict, name: str) -> dict:
    sampler = MemorySampler()
    try:
        result = run_federation(data_dir, out, run_config=run_config, run_name=name, on_start=sampler.attach)
    finally:
        sampler.stop()
    return {
        "wall_s": result.seconds,
        "round_s": [r["seconds"] for r in result.rounds],
        "peak_rss_mb": sampler.peak_bytes / 2**20,
        "sites": len(result.rounds[-1]["participants"]),
    }


def link_sites(data_dir: Path, target: Path, n: int) -> Path:
    """n site folders: links to the three real ones in turn (each virtual node still loads its own)."""
    target.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        link = target / f"site-{i:02d}"
        if not link.exists():
            link.symlink_to(data_dir / SITES[i % len(SITES)].name, target_is_directory=True)
    return target


def overhead_row(work: str, o: dict) -> str:
    f, b = o["federated_round_s"], o["bare_round_s"]
    return (f"| {work} | {statistics.median(f):.2f} | {', '.join(f'{v:.2f}' for v in f)} | "
            f"{statistics.median(b):.2f} | {', '.join(f'{v:.2f}' for v in b)} | {o['overhead_per_round_s']:+.2f} "
            f"| **{o['ratio']:.3f}** |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="local epochs per round for the overhead ratio")
    parser.add_argument("--rounds", type=int, default=3, help="rounds for the overhead ratio (the first is warm-up)")
    parser.add_argument("--demo-rounds", type=int, default=0,
                        help="also compare on the demo's work (4 demo sites, demo.sh's recipe) over this many rounds")
    parser.add_argument("--scale", default="3,10,30", help="site counts for the scaling runs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-federation-"))
    data = work / "data"
    generate_sites(data, SITES, seed=0, resolution=4, lesion_probability=0.7)

    # 1. Overhead ratio.
    ratio_config = {**BASE_CONFIG, "num-server-rounds": args.rounds, "local-epochs": args.epochs}
    overhead = overhead_ratio(data, [str(data / spec.name) for spec in SITES], ratio_config, "overhead")
    overhead["local_epochs"] = args.epochs
    print(f"overhead (tiny sites): {overhead}", flush=True)
    overhead_demo = None
    if args.demo_rounds:
        demo_data = work / "demo" / "data"
        demo_sites = [str(p) for p in generate_sites(demo_data, DEMO_SITES, seed=0)]
        demo_config = {**demo_recipe(), "num-server-rounds": args.demo_rounds}
        overhead_demo = overhead_ratio(demo_data, demo_sites, demo_config, "overhead-demo")
        overhead_demo["run_config"] = demo_config
        print(f"overhead (demo work): {overhead_demo}", flush=True)

    # 2. Scaling with the number of sites.
    scaling = []
    for n in (int(v) for v in args.scale.split(",")):
        sites_dir = link_sites(data, work / f"data{n}", n)
        run = federated(
            sites_dir, work / "runs", {**BASE_CONFIG, "num-server-rounds": 2, "local-epochs": 1}, f"scale{n}"
        )
        run["n_sites"] = n
        scaling.append(run)
        print(
            f"{n} sites: wall {run['wall_s']:.1f}s, rounds {run['round_s']}, peak RSS {run['peak_rss_mb']:.0f} MiB",
            flush=True,
        )

    results = {
        "benchmark": "federation",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "config": BASE_CONFIG,
        "overhead": overhead,
        "overhead_demo": overhead_demo,
        "scaling": scaling,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "federation.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Federation benchmark",
        "",
        f"Measured {results['time']} on {os.cpu_count()} CPU cores (load average {load_start[0]:.1f} at start, "
        f"{results['machine']['loadavg_end'][0]:.1f} at end; other work shares the machine). "
        "Tiny 4 mm sites, UNet channels 8,16,32, 32^3 crops.",
        "",
        "## Flower overhead per round",
        "",
        "Simulation engine, steady rounds (after the warm-up round), against the same work bare "
        "(2 one-thread worker processes).",
        "",
        "| work | federated round (s, median) | rounds | bare round (s, median) | rounds "
        "| overhead per round (s) | ratio (goal <= 1.10) |",
        "|---|---|---|---|---|---|---|",
        overhead_row(f"tiny: {len(SITES)} 4 mm sites, {args.epochs} local epochs", overhead),
    ]
    if overhead_demo:
        lines.append(overhead_row(f"demo: the 4 demo sites, scripts/demo.sh's recipe, "
                                  f"{overhead_demo['rounds']} rounds", overhead_demo))
    lines += [
        "",
        f"First federated round (tiny; Ray start-up, data caching): {overhead['federated_first_round_s']:.1f} s; "
        f"whole run {overhead['federated_wall_s']:.1f} s.",
        "",
        "## Simulation scaling",
        "",
        "2 rounds, 1 local epoch.",
        "",
        "| sites | wall (s) | round times (s) | peak RSS, all processes (MiB) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['n_sites']} | {r['wall_s']:.1f}"
        f" | {', '.join(f'{v:.1f}' for v in r['round_s'])} | {r['peak_rss_mb']:.0f} |"
        for r in scaling
    ]
    (out / "federation.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'federation.json'} and {out / 'federation.md'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
