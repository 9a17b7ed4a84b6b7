"""A site's SuperExec that forks each ClientApp process from a warm, pre-imported one.

Flower 1.41 runs every message a SuperNode receives in a fresh ``flwr-clientapp`` process: a new
interpreter that imports Flower (~1.2 s of CPU here) before it pulls the message — per site, per
message, on the round's critical path. This is Flower's own ``flower-superexec`` (same arguments,
same AcquireTask loop, same ``flwr-clientapp`` code and exit codes) with one difference in how the
process is started: a *zygote* process imports ``flwr-clientapp``'s modules once, while the site is
idle, and ``fork()``s one child per task. The child runs ``flwr-clientapp`` with exactly the
arguments Flower's subprocess executor would pass, so token, TLS and parent monitoring are Flower's.

Other task types (ServerApp, simulation, ...) and a dead zygote fall back to Flower's subprocess
executor. Run it as ``fedmri superexec`` (or ``python -m shared.superexec``), with
``flower-superexec``'s arguments; ``fedmri supernode`` starts it for SuperNodes that isolate their
ClientApps in subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import traceback

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import LaunchResult

__all__ = ["ForkServerExecutor", "main", "zygote"]

# Modules every flwr-clientapp process imports before it runs the app (fedmri's thin client.app adds
# nothing heavy; the site's torch work lives in its warm worker, see client/worker.py).
_PRELOAD = ("flwr.supernode.cli.flwr_clientapp", "flwr.clientapp", "flwr.app")


class ForkServerExecutor(SubprocessExecutor):
    """Flower's subprocess executor, with ClientApp tasks forked from a zygote started up front."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._zygote: subprocess.Popen | None = None
        self._start_zygote()

    def _start_zygote(self) -> None:
        # -m, not a fork of this process: the SuperExec holds an HTTP client and may run threads.
        self._zygote = subprocess.Popen(
            [sys.executable, "-m", "shared.superexec", "--zygote"], stdin=subprocess.PIPE, text=True
        )

    def launch(self, spec):
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        argv = ["flwr-clientapp", "--runtime-api-address", spec.runtime_api_address, "--token", spec.token]
        if spec.insecure:
            argv.append("--insecure")
        elif spec.root_certificates_path is not None:
            argv += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            argv += ["--parent-pid", str(spec.parent_pid)]
        if spec.runtime_dependency_install:
            argv.append("--allow-runtime-dependency-installation")
        with self._lock:
            if self._send(argv):
                return LaunchResult.accepted()
            self._start_zygote()  # a zygote that died is restarted once, then Flower's way
            if self._send(argv):
                return LaunchResult.accepted()
        return super().launch(spec)

    def _send(self, argv: list[str]) -> bool:
        if self._zygote is None or self._zygote.poll() is not None:
            return False
        try:
            self._zygote.stdin.write(json.dumps(argv) + "\n")
            self._zygote.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def close(self) -> None:
        with self._lock:
            if self._zygote is not None and self._zygote.poll() is None:
                self._zygote.stdin.close()  # EOF: the zygote exits; its running children finish their task
                try:
                    self._zygote.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._zygote.kill()
            self._zygote = None


def _reap(*_) -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def zygote(stream=None) -> None:
    """Import flwr-clientapp once, then fork one child per JSON argv line on ``stream`` (stdin) until EOF."""
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)
    import httpx

    from shared.supernode import patch_object_pulls

    patch_object_pulls()  # the children ask their SuperNode for the message right after it arrived
    httpx.Client().close()  # its transport imports httpcore (and anyio) on first use: ~0.4 s per process
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    stream = stream or sys.stdin
    signal.signal(signal.SIGCHLD, _reap)
    for line in stream:
        try:
            argv = json.loads(line)
        except ValueError:
            continue
        pid = os.fork()
        if pid:
            continue
        # The child: Flower's flwr-clientapp, as if started by the subprocess executor.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # its own subprocess waits need their exit statuses
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        code = 1
        try:
            sys.argv = argv
            flwr_clientapp()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """``flower-superexec`` with ClientApp processes forked from a warm zygote."""
    import flwr.supercore.superexec.run_superexec as loop
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import ExecutorType

    flower_get_executor = loop.get_executor

    def get_executor(executor_type, **kwargs):
        if executor_type == ExecutorType.SUBPROCESS:
            return ForkServerExecutor()
        return flower_get_executor(executor_type, **kwargs)

    # run_superexec builds its executor through this module-level name: the one seam Flower leaves.
    loop.get_executor = get_executor
    sys.argv = ["flower-superexec", *(sys.argv[1:] if argv is None else argv)]
    flower_superexec()


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        zygote()
    else:
        main()
