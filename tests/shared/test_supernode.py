"""fedmri's tunings of Flower's SuperNode and SuperExec (shared/supernode.py, shared/superexec.py).

Each check runs in a fresh interpreter: the patches change Flower's modules in the process that applies them.
The federation tests (tests/server/federation/test_native.py) run them end to end with real processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    if "stdout" not in kwargs:
        kwargs["capture_output"] = True
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True, timeout=120, check=False, **kwargs)


def test_flower_still_has_every_patch_point_and_the_patches_take():
    """A Flower upgrade that moves a patch point must fail here, not silently slow every round back down."""
    res = run_python(
        """
import time
from shared.supernode import patch_supernode
import flwr.supernode.start_client_internal as loop
import flwr.supercore.inflatable.inflatable_utils as objects
applied = patch_supernode(0.05)
assert len(applied) == 3, applied
t = time.monotonic(); loop.time.sleep(3); slept = time.monotonic() - t
assert slept < 0.5, slept                      # Flower's idle sleep(3) is capped
t = time.monotonic(); loop.time.sleep(0.5); local = time.monotonic() - t
assert local < 0.2, local                      # ... and its 0.5 s checks of its own state
assert loop.time.monotonic() > 0               # everything else is the real time module
for pulls in (objects.pull_objects.__kwdefaults__, objects.pull_and_inflate_object_from_tree.__kwdefaults__):
    assert (pulls["initial_backoff"], pulls["backoff_cap"]) == (0.05, 0.1)
    assert pulls["max_tries_per_object"] * pulls["backoff_cap"] == 500 * 10  # Flower's total patience is kept
proc = loop.subprocess.Popen(["flower-superexec", "--help"], stdout=loop.subprocess.PIPE, text=True)
out, _ = proc.communicate(timeout=60)
assert proc.args[1:3] == ["-m", "shared.superexec"], proc.args  # Flower's SuperExec launch, redirected
assert "--runtime-api-address" in out                            # ... to a SuperExec with the same arguments
print("ok")
"""
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


def test_stock_flower_supernode_is_left_alone_when_asked():
    res = run_python(
        """
import subprocess, time
from shared.supernode import patch_supernode
import flwr.supernode.start_client_internal as loop
assert patch_supernode(None, fork_server=False) == ["object-pull retries every 0.05-0.1s"]
assert loop.time is time and loop.subprocess is subprocess
print("ok")
"""
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_zygote_forks_one_flwr_clientapp_per_line_and_exits_at_eof():
    """The warm process runs Flower's own flwr-clientapp (here its --help) in a forked child per request."""
    zygote = subprocess.Popen(
        [sys.executable, "-m", "shared.superexec", "--zygote"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    request = json.dumps(["flwr-clientapp", "--help"]) + "\n"
    try:  # a line that is not JSON is ignored and the zygote stays up; EOF ends it
        out, err = zygote.communicate(request + "not json\n" + request, timeout=120)
    finally:
        zygote.kill()
    assert zygote.returncode == 0, err
    assert out.count("Run a Flower ClientApp") == 2  # flwr-clientapp's own usage text, once per child


def test_executor_forks_clientapps_and_restarts_a_dead_zygote(tmp_path):
    """ForkServerExecutor: a ClientApp task reaches the zygote; a dead zygote is restarted; close() stops it.
    (The forked children find no SuperNode at 127.0.0.1:1 and retry until their parent, the script, is gone:
    its output goes to a file so that the test does not wait for them.)"""
    out = tmp_path / "out.txt"
    with out.open("w") as sink:
        res = run_python(
            """
import os
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResultStatus
from shared.superexec import ForkServerExecutor

ex = ForkServerExecutor()
spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:1", token="t0k3n",
                     insecure=True, root_certificates_path=None, runtime_dependency_install=False,
                     parent_pid=os.getpid(), suppress_output=False, task_id=1)
first = ex._zygote.pid
assert ex.launch(spec).status == LaunchResultStatus.ACCEPTED
ex._zygote.kill(); ex._zygote.wait()
assert ex.launch(spec).status == LaunchResultStatus.ACCEPTED   # restarted, not failed
second = ex._zygote.pid
assert second != first
ex.close()
assert ex._zygote is None
print("ok")
""",
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    assert res.returncode == 0 and "ok" in out.read_text(), out.read_text()


def test_fedmri_supernode_and_superexec_pass_flower_arguments_through():
    for command, flower_text in (("supernode", "--superlink"), ("superexec", "--runtime-api-address")):
        res = subprocess.run(
            [sys.executable, "-m", "server.cli", command, "--help"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert res.returncode == 0 and flower_text in res.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "server.cli", "supernode", "--poll-interval", "9", "--superlink", "127.0.0.1:1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0 and "--poll-interval must be between" in bad.stderr
