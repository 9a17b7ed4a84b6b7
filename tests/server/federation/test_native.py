"""Native deployment: real flower-superlink and one SuperNode (``fedmri supernode``) per site on 127.0.0.1.

One run serves these tests: it must complete, and killing one SuperNode (SIGKILL, a crash)
after round 1 must leave a run that finishes with the other sites and names the missing one.
"""

from __future__ import annotations

import os
import time

import pytest

from server.federation import run_federation
from shared.registry import read_meta, served_version
from shared.runlog import round_records

from .helpers import tiny_config

pytestmark = pytest.mark.slow

SITES = ["site-a", "site-b", "site-c"]
VICTIM = "site-c"


@pytest.fixture(scope="module")
def native_run(tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("native-runs")
    seen: dict = {"procs": {}}

    def on_start(federation):
        seen["address"] = federation.address
        seen["procs"] = {
            name: (p.popen.pid, p.cmd)
            for name, p in [("superlink", federation.superlink)] + [(s, p) for s, p in federation.supernodes.items()]
        }
        seen["federation"] = federation

    def on_record(record):
        if record["event"] == "round" and record["round"] == 1 and "killed" not in seen:
            seen["federation"].kill_supernode(VICTIM)
            seen["killed"] = time.monotonic()

    try:
        result = run_federation(
            tiny_data_dir,
            out,
            mode="native",
            run_name="native",
            # A fresh process per message (no warm worker): the path the site's disk cache is for, and the
            # worker's fallback; test_warm_worker.py runs the same federation with the worker.
            run_config=tiny_config(**{"num-server-rounds": 2, "round-timeout": 150, "warm-worker": False}),
            on_start=on_start,
            on_record=on_record,
            timeout=420,
        )
        seen["leftovers"] = seen["federation"].leftover_pids()
    finally:
        if "federation" in seen:
            seen["federation"].close()
    return result, seen


def test_native_deployment_runs_real_processes_and_completes(native_run):
    result, seen = native_run
    host, port = seen["address"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) not in (8000, 8080)
    assert seen["procs"]["superlink"][1][0] == "flower-superlink"
    for site in SITES:
        pid, cmd = seen["procs"][site]
        assert cmd[:2] == ["fedmri", "supernode"] and f'site="{site}"' in cmd[cmd.index("--node-config") + 1]
    first = round_records(result.log_path)[0]
    assert first["participants"] == SITES  # every SuperNode trained in round 1
    # Flower's SuperNode ran with fedmri's tunings, and its ClientApps were forked by shared.superexec
    log = (seen["federation"].work_dir / "supernode-site-a.log").read_text()
    assert "poll-interval=0.2s" in log and "fork-server ClientApps" in log
    assert first["sites"]["site-a"]["train"]["time_process_start"] > 0
    assert result.version == "native-r2" and served_version(result.registry) == "native-r2"
    assert read_meta(result.registry, "native-r1")["sites"] == SITES


def test_killed_supernode_is_recorded_missing_and_the_run_finishes(native_run):
    result, seen = native_run
    assert "killed" in seen
    rounds = round_records(result.log_path)
    assert [r["round"] for r in rounds] == [1, 2]
    second = rounds[1]
    assert second["missing"] == [VICTIM]
    assert second["participants"] == ["site-a", "site-b"] and second["updated"] and second["global_finite"]
    assert any(r["site"] == VICTIM and r["phase"] == "train" for r in second["no_reply"] + second["failed"])
    assert read_meta(result.registry, "native-r2")["missing_sites"] == [VICTIM]


def test_every_flower_process_is_stopped(native_run):
    _, seen = native_run
    assert seen["leftovers"] == set()
    for pid, _ in seen["procs"].values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_round_2_reads_the_sites_disk_cache_and_carries_round_1s_evaluation(native_run):
    """A fresh ClientApp process per message: round 2 finds every preprocessed volume on the site's disk,
    and its one message per site also brings the evaluation of round 1's global model (eval-with-train)."""
    result, _ = native_run
    first, second = round_records(result.log_path)
    for site in ("site-a", "site-b"):
        train, evaluated = second["sites"][site]["train"], second["sites"][site]["eval"]
        assert train["cache_hits"] >= train["num-examples"]  # every training volume read ready from disk
        assert evaluated["cache_built"] == 0 and evaluated["cache_hits"] > train["num-examples"]  # train + val
        assert train["threads"] >= 1 and train["time_train"] > 0 and train["time_process_start"] > 0
        assert 0.0 <= first["sites"][site]["eval"]["dice_mean"] <= 1.0  # measured in round 2, filed under round 1
        assert 0.0 <= second["sites"][site]["eval"]["dice_mean"] <= 1.0  # the last round's own evaluate message
    assert first["eval_late"] and "eval" not in first["sites"][VICTIM]  # killed before it could report it
