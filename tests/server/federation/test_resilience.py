"""Real Flower processes under attack and failure: a node posing as another site, a crashed server, a
SuperNode that comes back. Native mode (flower-superlink + one flower-supernode per site on 127.0.0.1).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from server.federation import FederationError, run_federation
from server.federation.launcher import free_port, supernode_command
from shared.registry import load_server_state, read_meta
from shared.runlog import read_run_log, round_records

from .helpers import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def impostor_run(credentials, tiny_data_dir, tmp_path_factory):
    """Sites a and b are genuine; a third node holds site-c's registered key but reports itself as site-a."""
    certs, keys = credentials
    out = tmp_path_factory.mktemp("identity-runs")
    seen: dict = {}

    def on_start(federation):
        node = federation.register_key("site-c")  # the operator registered site-c's key ...
        federation.identities[node] = "site-c"
        federation.write_identities()
        cmd = supernode_command(
            federation.address,
            free_port(),
            "site-a",
            str(tiny_data_dir / "site-c"),
            ca_cert=str(certs / "ca.crt"),
            auth_key=str(keys / "site-c"),
        )
        log = (out / "impostor.log").open("w")  # ... but that node says it is site-a
        seen["impostor"] = subprocess.Popen(
            cmd, env=federation.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        seen["node"], seen["federation"] = node, federation

    try:
        result = run_federation(
            tiny_data_dir,
            out,
            mode="native",
            sites=["site-a", "site-b"],
            run_name="identity",
            run_config=tiny_config(**{"num-server-rounds": 1, "round-timeout": 150}),
            tls_dir=certs,
            auth_keys_dir=keys,
            on_start=on_start,
            timeout=420,
        )
    finally:
        if "impostor" in seen:
            os.killpg(seen["impostor"].pid, signal.SIGKILL)
            seen["impostor"].wait(timeout=10)
    return result, seen


def test_a_node_reporting_another_sites_name_is_refused_and_marked(impostor_run):
    result, seen = impostor_run
    record = round_records(result.log_path)[0]
    refused = [r for r in record["refused"] if r["node_id"] == seen["node"]]
    assert refused and all(r["site"] == "site-a" for r in refused)
    assert all("its key is registered to 'site-c'" in r["reason"] for r in refused)
    assert record["participants"] == ["site-a", "site-b"]  # the genuine site-a, not overwritten
    assert record["sites"]["site-a"]["node_id"] != seen["node"]
    assert "refused the reply of node" in (result.run_dir / "flower.log").read_text()


@pytest.fixture(scope="module")
def crashed_and_resumed(tiny_data_dir, tmp_path_factory):
    """FedAdam, 4 rounds: SuperLink and ServerApp killed after round 1; resumed; in the resumed run
    site-c's SuperNode is killed after round 2 and started again."""
    out = tmp_path_factory.mktemp("crash-runs")
    config = tiny_config(**{"num-server-rounds": 4, "round-timeout": 150, "strategy": "fedadam"})
    crash: dict = {}

    def keep(federation):
        crash["federation"] = federation

    def kill_server(record):
        if record["event"] == "round" and record["round"] == 1 and "done" not in crash:
            crash["done"] = True
            federation = crash["federation"]
            federation.superlink.signal_group(signal.SIGKILL)
            for pid in federation.leftover_pids():  # the ServerApp process the SuperLink started
                try:
                    if b"serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGKILL)
                except (FileNotFoundError, ProcessLookupError):
                    pass

    with pytest.raises(FederationError):
        run_federation(
            tiny_data_dir,
            out,
            mode="native",
            run_name="crash",
            run_config=config,
            on_start=keep,
            on_record=kill_server,
            timeout=420,
        )
    bounce: dict = {}

    def restart_site_c(record):
        if record["event"] == "round" and record["round"] == 2 and "done" not in bounce:
            bounce["done"] = True
            federation = crash["federation"]
            federation.kill_supernode("site-c")
            federation.start_supernode("site-c", tiny_data_dir / "site-c")

    result = run_federation(
        tiny_data_dir,
        out,
        mode="native",
        run_name="crash",
        run_config={**config, "resume": True},
        on_start=keep,
        on_record=restart_site_c,
        timeout=600,
    )
    return result, crash, bounce


def test_a_crashed_server_resumes_to_the_planned_rounds_with_fedadams_moments(crashed_and_resumed):
    result, crash, _ = crashed_and_resumed
    assert crash.get("done")
    assert [r["round"] for r in round_records(result.log_path)] == [1, 2, 3, 4]
    assert result.version == "crash-r4"
    starts = [r for r in read_run_log(result.log_path) if r["event"] == "start"]
    assert starts[-1]["resumed_from"] == "crash-r1" and starts[-1]["restored"] == ["m_t", "v_t"]
    for version in ("crash-r1", "crash-r2", "crash-r3", "crash-r4"):
        moments = load_server_state(result.registry, version)
        assert moments and {k.split("/")[0] for k in moments} == {"m_t", "v_t"}
        assert read_meta(result.registry, version)["strategy"] == "fedadam"


def test_a_restarted_supernode_rejoins(crashed_and_resumed):
    """The round right after the restart may start before the new SuperNode is up; the one after has it."""
    result, _, bounce = crashed_and_resumed
    assert bounce.get("done")
    last = round_records(result.log_path)[-1]
    assert last["round"] == 4 and "site-c" in last["participants"]
