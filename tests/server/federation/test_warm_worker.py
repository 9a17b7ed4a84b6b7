"""Native deployment with each site's warm worker (client/worker.py) against the simulation, real processes.

One native run of 4 rounds (real flower-superlink, flower-supernode, flwr-clientapp and worker
processes): every site's worker serves rounds 1-3, is killed once round 3 is logged, and round 4
still completes; the per-round Dice equals the simulation's; nothing outlives the launcher.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from server.federation import run_federation
from shared.runlog import read_run_log

from .helpers import Tracker, tiny_config

pytestmark = pytest.mark.slow

SITES = ["site-a", "site-b"]
ROUNDS = 5
KILL_AFTER = 3  # the round after next is surely dispatched after the kill (the log is followed every 0.5 s)


def worker_pids(flwr_home: Path) -> set[int]:
    """Live ``client.worker`` processes started under this launcher's FLWR_HOME."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"client.worker" in (entry / "cmdline").read_bytes():
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                        found.add(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def per_round(log_path: Path) -> tuple[dict, dict]:
    """({round: {site: train metrics}}, {round: {site: dice_mean}}): train from a round's first record, the
    evaluation from its latest (eval-with-train files it under the round whose model it measured)."""
    train: dict[int, dict] = {}
    dice: dict[int, dict] = {}
    for rec in read_run_log(log_path):
        if rec.get("event") != "round":
            continue
        for site, info in rec["sites"].items():
            if "train" in info and site not in train.setdefault(rec["round"], {}):
                train[rec["round"]][site] = info["train"]
            if "eval" in info:
                dice.setdefault(rec["round"], {})[site] = info["eval"]["dice_mean"]
    return train, dice


@pytest.fixture(scope="module")
def runs(tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("warm")
    config = tiny_config(**{"num-server-rounds": ROUNDS, "round-timeout": 200, "max-steps": 2})
    seen: dict = {"killed": set()}
    tracker = Tracker()

    def on_start(federation):
        tracker(federation)
        seen["home"] = federation.flwr_home

    def on_record(record):
        if record.get("event") == "round" and record["round"] == ROUNDS:  # workers up while the run goes on
            seen.setdefault("late_workers", set()).update(worker_pids(seen["home"]))
        if record.get("event") == "round" and record["round"] == KILL_AFTER and not seen["killed"]:
            seen["before_kill"] = worker_pids(seen["home"])
            for pid in seen["before_kill"]:
                signal_pid(pid)
            seen["killed"] = seen["before_kill"] or {0}

    try:
        native = run_federation(tiny_data_dir, out / "native", sites=SITES, mode="native", run_name="warm",
                                run_config=config, on_start=on_start, on_record=on_record, timeout=600)
    finally:
        seen["workers_after_close"] = worker_pids(seen["home"])  # run_federation has closed its launcher
        tracker.cleanup()
    seen["leftovers"] = tracker.leftovers()
    sim_tracker = Tracker()
    try:
        sim = run_federation(tiny_data_dir, out / "sim", sites=SITES, run_name="sim", run_config=config,
                             on_start=sim_tracker, timeout=600)
    finally:
        sim_tracker.cleanup()
    return native, sim, seen


def signal_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_each_site_keeps_one_worker_across_rounds(runs):
    native, _, _ = runs
    train, _ = per_round(native.log_path)
    for site in SITES:
        pids = [train[k][site]["worker_pid"] for k in range(1, KILL_AFTER + 1)]
        assert len(set(pids)) == 1, f"{site}: workers {pids}"
        assert train[1][site]["worker_started"] == 1 and train[1][site]["worker_fallback"] == 0
        assert all(train[k][site]["worker_started"] == 0 for k in range(2, KILL_AFTER + 1))
        assert train[KILL_AFTER][site]["worker_messages"] == KILL_AFTER
        assert train[2][site]["time_handoff"] >= 0 and train[2][site]["time_import"] >= 0


def test_a_killed_worker_costs_no_round(runs):
    native, _, seen = runs
    assert seen["killed"] and 0 not in seen["killed"]  # the workers were found and killed after round 3
    train, dice = per_round(native.log_path)
    for k in range(KILL_AFTER + 1, ROUNDS + 1):  # no round lost: every site answered every later round
        assert sorted(train[k]) == SITES, k
        assert sorted(dice[k]) == SITES, k
    for site in SITES:
        # Round 4's message may reach the old worker before the kill lands (the run log is only followed every
        # 0.5 s); the first round served by another worker started it (or the site worked in its own process).
        later = [train[k][site] for k in range(KILL_AFTER + 1, ROUNDS + 1)]
        fresh = [t for t in later if t["worker_pid"] not in seen["killed"]]
        assert fresh, f"{site}: every round after the kill was served by a killed worker"
        assert fresh[0]["worker_started"] == 1 or fresh[0]["worker_fallback"] == 1
        assert later[-1]["worker_pid"] not in seen["killed"]


def test_native_with_workers_gives_the_simulations_dice_every_round(runs):
    native, sim, _ = runs
    _, native_dice = per_round(native.log_path)
    _, sim_dice = per_round(sim.log_path)
    assert sorted(native_dice) == sorted(sim_dice) == list(range(1, ROUNDS + 1))
    for k in sim_dice:
        for site in SITES:
            assert native_dice[k][site] == pytest.approx(sim_dice[k][site], abs=1e-4), (k, site)


def test_no_worker_outlives_the_launcher(runs):
    _, _, seen = runs
    assert seen["late_workers"]  # workers were up in the last round
    assert seen["workers_after_close"] == set()
    assert seen["leftovers"] == set()
