"""The site's warm worker (client/worker.py) behind the thin ClientApp: real worker processes, real sockets.

The ClientApp is called as Flower calls it in a deployment (node config ``data-dir``); the worker is a
real detached process. Every test stops the workers it started.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from multiprocessing.connection import Listener
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import worker
from client.app import app
from shared.model import build_unet
from shared.runconfig import RunConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("task_identity")]

RUN = {"channels": "8,16,32", "roi-size": "32,32,32", "spacing": "4,4,4", "max-steps": 2, "local-epochs": 1}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _alive(pid)


@pytest.fixture
def workers(tmp_path_factory):
    """A private worker folder; every worker process seen in a reply is killed afterwards."""
    folder = tmp_path_factory.mktemp("wk")
    pids: set[int] = set()
    yield folder, pids
    for entry in Path("/proc").iterdir():  # also a worker that never answered
        try:
            if entry.name.isdigit() and str(folder).encode() in (entry / "cmdline").read_bytes():
                pids.add(int(entry.name))
        except OSError:
            continue
    for pid in pids - {os.getpid()}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _context(site_dir: Path, folder: Path, **run) -> Context:
    node = {"site": site_dir.name, "data-dir": str(site_dir), "worker-dir": str(folder)}
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={**RUN, **run})


def _message(kind: str, state: dict, server_round: int = 1) -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord(torch_state_dict=state), "config": ConfigRecord({"server-round": server_round})}
    )
    return Message(content=content, dst_node_id=7, message_type=kind)


def _global_state() -> dict:
    torch.manual_seed(0)
    return build_unet(RunConfig.from_run_config(RUN).network_config()).state_dict()


def _send(kind, state, context, pids, server_round=1):
    reply = app(_message(kind, state, server_round), context)
    assert not reply.has_error(), reply.error
    pids.add(int(reply.content["metrics"]["worker_pid"]))
    return reply


def test_the_worker_answers_as_the_task_in_process_would_and_is_reused(tiny_data_dir, workers):
    folder, pids = workers
    site = tiny_data_dir / "site-a"
    state = _global_state()
    warm = _context(site, folder)
    first = _send("train", state, warm, pids)
    m1 = first.content["metrics"]
    assert m1["worker_started"] == 1 and m1["worker_fallback"] == 0 and m1["worker_pid"] != os.getpid()
    assert "ood-reference" in warm.state  # the worker's updated context state came back
    cold = _context(site, folder, **{"warm-worker": False})
    local = app(_message("train", state), cold)
    assert local.content["metrics"]["worker_pid"] == os.getpid()
    got, want = first.content["arrays"].to_torch_state_dict(), local.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)  # same update, bit for bit
    assert m1["train_loss"] == local.content["metrics"]["train_loss"]
    assert m1["time_handoff"] >= 0 and m1["time_train"] > 0 and m1["time_process_start"] > 0

    second = _send("train", state, warm, pids, server_round=2)
    m2 = second.content["metrics"]
    assert m2["worker_pid"] == m1["worker_pid"] and m2["worker_started"] == 0 and m2["worker_messages"] == 2
    round2_local = app(_message("train", state, 2), cold).content["arrays"].to_torch_state_dict()
    got = second.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(got[k], round2_local[k]) for k in got)  # reseeded per round, not per process

    evaluated = _send("evaluate", state, warm, pids)
    assert evaluated.content["metrics"]["worker_pid"] == m1["worker_pid"]
    assert 0.0 <= evaluated.content["metrics"]["dice_1"] <= 1.0
    with pytest.raises(ValueError, match="'strategy'"):  # the task's own errors come back as they were raised
        app(_message("train", state), _context(site, folder, strategy="fedsgd"))
    assert _send("evaluate", state, warm, pids).content["metrics"]["worker_pid"] == m1["worker_pid"]


def test_a_killed_worker_is_replaced_and_one_dying_mid_message_leaves_the_work_to_the_clientapp(
    tiny_data_dir, workers, caplog
):
    folder, pids = workers
    site = tiny_data_dir / "site-b"
    state = _global_state()
    context = _context(site, folder)
    pid = int(_send("evaluate", state, context, pids).content["metrics"]["worker_pid"])
    os.kill(pid, signal.SIGKILL)  # between messages
    assert _gone(pid)
    again = _send("evaluate", state, context, pids).content["metrics"]
    assert again["worker_pid"] != pid and again["worker_started"] == 1 and again["worker_fallback"] == 0
    os.kill(int(again["worker_pid"]), signal.SIGKILL)
    assert _gone(int(again["worker_pid"]))

    # A "worker" that takes the message and dies before answering.
    sock = worker.socket_path(context.node_config)
    sock.unlink(missing_ok=True)
    listener = Listener(str(sock), family="AF_UNIX", authkey=sock.with_suffix(".auth").read_bytes())
    import threading

    def die_mid_message():
        conn = listener.accept()
        conn.recv()
        conn.close()

    thread = threading.Thread(target=die_mid_message, daemon=True)
    thread.start()
    with caplog.at_level(logging.WARNING, logger="client.app"):
        reply = _send("evaluate", state, context, pids)
    thread.join(10)
    listener.close()
    metrics = reply.content["metrics"]
    assert metrics["worker_fallback"] == 1 and metrics["worker_pid"] == os.getpid()
    assert metrics["dice_1"] == again["dice_1"]  # the same evaluation, done in this process
    assert "worker unavailable" in caplog.text and "site-b" in caplog.text


def test_a_worker_that_cannot_start_leaves_the_work_to_the_clientapp(tiny_data_dir, tmp_path, workers, caplog):
    _, pids = workers
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    context = _context(tiny_data_dir / "site-a", blocker / "workers")
    with caplog.at_level(logging.WARNING, logger="client.app"):
        reply = _send("evaluate", _global_state(), context, pids)
    assert reply.content["metrics"]["worker_fallback"] == 1
    assert "worker unavailable" in caplog.text


def test_the_worker_exits_when_idle_and_when_its_socket_is_removed(tiny_data_dir, workers):
    folder, pids = workers
    state = _global_state()
    idle = _context(tiny_data_dir / "site-c", folder, **{"worker-idle-timeout": 1.0})
    pid = int(_send("evaluate", state, idle, pids).content["metrics"]["worker_pid"])
    assert _gone(pid, timeout=60)
    assert not worker.socket_path(idle.node_config).exists()  # it cleaned up after itself

    context = _context(tiny_data_dir / "site-c", folder)
    pid = int(_send("evaluate", state, context, pids).content["metrics"]["worker_pid"])
    assert _alive(pid)
    worker.socket_path(context.node_config).unlink()
    assert _gone(pid, timeout=30)


def test_the_thin_clientapp_imports_neither_torch_nor_monai_nor_the_task():
    """A deployment starts a fresh ClientApp process per message: its module must stay cheap to import."""
    import subprocess
    import sys

    code = (
        "import sys, client.app; heavy = [m for m in ('torch', 'monai', 'client.task', 'shared.training',"
        " 'shared.runconfig') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
