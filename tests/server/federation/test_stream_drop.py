"""A dropped `flwr run --stream` is not a failed federation: the launcher follows the run log to its end.

Under load the streaming `flwr run` process can exit while the ServerApp is still mid-run (seen on the
2-core machine). Here it is killed for real after round 1 of a 3-round simulation."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from server.federation import run_federation
from shared.runlog import round_records

from .helpers import Tracker, tiny_config

pytestmark = pytest.mark.slow


def _stream_pids(work_dir: Path) -> list[int]:
    """PIDs of the `flwr run ... --stream` process of this federation (its run-config lives in work_dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if "--stream" in text and any(str(work_dir) in a for a in text) and any(a.endswith("flwr") for a in text):
            pids.append(int(proc.name))
    return pids


def test_a_run_whose_log_stream_drops_still_completes_all_rounds(tiny_data_dir, tmp_path):
    tracker = Tracker()
    killed: list[int] = []
    lines: list[str] = []

    def on_record(record: dict) -> None:
        if record.get("event") == "round" and record.get("round") == 1 and not killed:
            for pid in _stream_pids(tracker.federations[0].work_dir):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    try:
        result = run_federation(
            tiny_data_dir,
            tmp_path / "runs",
            run_config=tiny_config(**{"num-server-rounds": 3}),
            run_name="dropped",
            on_record=on_record,
            on_start=tracker,
            echo=lines.append,
        )
        leftovers = tracker.leftovers()
    finally:
        tracker.cleanup()
    assert killed, "the streaming flwr run process was not found"
    assert any("log stream ended before run" in line for line in lines)
    assert [r["round"] for r in round_records(result.log_path)] == [1, 2, 3]
    assert result.version.endswith("-r3")
    assert not leftovers
