"""A warm per-site worker process: what a simulation actor is for the simulation, for a deployment.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message a SuperNode receives, so
every message would pay interpreter start-up, importing torch, MONAI and ``shared``, rebuilding
the site's loader and torch's lazy imports on the first optimiser step. The thin ClientApp
(``client/app.py``) instead hands the message's content and the node's context (node config, run
config, state) to this site's worker over a local socket and returns what the worker answers:

* one worker per site data folder, Python executable, ``FLWR_HOME`` and version of the code
  (a digest of ``client/`` and ``shared/``): a worker of older code is never used;
* an ``AF_UNIX`` socket and a random authentication key (``multiprocessing.connection``) in a
  folder only this user can enter (``0700``): node config ``worker-dir``, else
  ``<tmp>/fedmri-workers-<uid>``;
* started on demand, detached (its own session), so it outlives the ClientApp process that
  started it; it serves one message at a time and keeps its imports and the site's loaders
  (:mod:`client.task`), never anything that changes the numbers (every message reseeds);
* it exits after ``worker-idle-timeout`` seconds without a message, and when its socket file is
  removed or replaced;
* any failure to reach it (cannot start, dies mid-message) raises :class:`WorkerUnavailable`, and
  the ClientApp does the work in its own process: slower, never a lost round.

Only the standard library is imported here (the thin ClientApp imports this module).
Run as ``python -m client.worker --socket PATH`` (the ClientApp does that).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import pickle
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from functools import lru_cache
from multiprocessing.connection import AuthenticationError, Client, Listener
from pathlib import Path

__all__ = ["WorkerUnavailable", "call", "socket_path", "worker_dir", "DEFAULT_IDLE_TIMEOUT"]

ROOT = Path(__file__).resolve().parents[1]  # the app's root (Flower's unpacked bundle in a deployment)
PROTOCOL = 1
DEFAULT_IDLE_TIMEOUT = 600.0
START_TIMEOUT = float(os.environ.get("FEDMRI_WORKER_START_TIMEOUT", "120"))
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux


class WorkerUnavailable(RuntimeError):
    """The site's worker could not be started or reached, or died before it answered."""


@lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 of the code a worker runs (every ``.py`` file under ``client/`` and ``shared/``)."""
    h = hashlib.sha256()
    for pkg in ("client", "shared"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def worker_dir(node_config) -> Path:
    """Where the site's worker sockets live: node config ``worker-dir``, else ``<tmp>/fedmri-workers-<uid>``."""
    configured = str(node_config.get("worker-dir", "") or "")
    return Path(configured or Path(tempfile.gettempdir()) / f"fedmri-workers-{os.getuid()}")


def worker_key(node_config) -> str:
    """The worker's identity: site data folder, Python, ``FLWR_HOME`` (one launcher's processes) and code."""
    data_dir = str(Path(str(node_config["data-dir"])).resolve())
    parts = [PROTOCOL, data_dir, sys.executable, os.environ.get("FLWR_HOME", ""), source_digest()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def socket_path(node_config) -> Path:
    """The socket of the worker that serves this node (whether it runs or not)."""
    return worker_dir(node_config) / f"{worker_key(node_config)}.sock"


def _private_dir(path: Path) -> Path:
    """Create ``path`` (0700) or check that an existing one is ours and closed to others."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise WorkerUnavailable(f"worker folder {path}: {exc.strerror or exc}") from None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise WorkerUnavailable(f"worker folder {path} must belong to this user with mode 0700")
    return path


def _connect(sock: Path, auth: Path):
    """A connection to the worker at ``sock``, or None if none answers there."""
    try:
        key = auth.read_bytes()
        return Client(str(sock), family="AF_UNIX", authkey=key)
    except (OSError, EOFError, AuthenticationError):
        return None


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _spawn(sock: Path, auth: Path, idle_timeout: float) -> subprocess.Popen:
    """Start a detached worker on ``sock`` with a fresh key in ``auth``."""
    for stale in (sock, auth):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    fd = os.open(auth, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "client.worker", "--socket", str(sock), "--idle-timeout", str(idle_timeout)]
    with open(sock.with_suffix(".log"), "ab") as log:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # not in the ClientApp's process group: it outlives the ClientApp process
        )


def _connect_or_start(node_config, idle_timeout: float):
    """(connection, started): the site's running worker, else one started now."""
    folder = _private_dir(worker_dir(node_config))
    key = worker_key(node_config)
    sock, auth = folder / f"{key}.sock", folder / f"{key}.auth"
    if len(str(sock)) > MAX_SOCKET_PATH:
        raise WorkerUnavailable(f"socket path {sock} is too long (set node config worker-dir)")
    if conn := _connect(sock, auth):
        return conn, False
    with _locked(folder / f"{key}.lock"):
        if conn := _connect(sock, auth):  # another ClientApp process of this site started it meanwhile
            return conn, False
        try:
            proc = _spawn(sock, auth, idle_timeout)
        except OSError as exc:
            raise WorkerUnavailable(f"cannot start the worker: {exc}") from None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if sock.exists() and (conn := _connect(sock, auth)):
                return conn, True
            if proc.poll() is not None:
                log = sock.with_suffix(".log")
                raise WorkerUnavailable(f"the worker exited with code {proc.returncode} (log {log})")
            time.sleep(0.05)
        proc.kill()
        raise WorkerUnavailable(f"the worker did not listen within {START_TIMEOUT:.0f}s")


def call(kind: str, content, context, idle_timeout: float = DEFAULT_IDLE_TIMEOUT):
    """Run ``client.task``'s ``kind`` ("train" or "evaluate") in the site's worker.

    Returns ``(reply content, new context.state, info)`` with info ``pid``, ``messages`` (served by
    that worker so far) and ``started`` (1 if this call started it). An exception the task raised is
    raised here as it was; :class:`WorkerUnavailable` when the worker could not do the work.
    """
    try:
        conn, started = _connect_or_start(context.node_config, idle_timeout)
    except OSError as exc:  # e.g. a read-only worker folder
        raise WorkerUnavailable(f"cannot reach or start the worker: {exc}") from None
    request = {
        "protocol": PROTOCOL,
        "kind": kind,
        "content": content,
        "run_id": context.run_id,
        "node_id": context.node_id,
        "node_config": dict(context.node_config),
        "run_config": dict(context.run_config),
        "state": context.state,
        "idle_timeout": float(idle_timeout),
    }
    try:
        conn.send(request)
        reply = conn.recv()
    except (OSError, EOFError) as exc:
        raise WorkerUnavailable(f"the worker died before it answered ({type(exc).__name__})") from None
    except Exception as exc:  # a message or reply that does not pickle: the work can still be done here
        raise WorkerUnavailable(f"the message could not be handed over: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()
    if not reply.get("ok"):
        error = reply.get("error")
        if isinstance(error, BaseException):
            raise error
        raise WorkerUnavailable(f"the worker could not do the work: {reply.get('reason')}")
    info = {"pid": int(reply["pid"]), "messages": int(reply["messages"]), "started": int(started)}
    return reply["content"], reply["state"], info


# ---- the worker process ---------------------------------------------------------------------------


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (the ClientApp re-raises it), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class _Worker:
    def __init__(self, sock: Path, idle_timeout: float) -> None:
        self.sock, self.auth = sock, sock.with_suffix(".auth")
        self.idle_timeout = idle_timeout
        self.busy = False
        self.last = time.monotonic()
        self.messages = 0
        self.lock = threading.Lock()
        self.listener = Listener(str(sock), family="AF_UNIX", authkey=self.auth.read_bytes())
        os.chmod(sock, 0o600)
        self.inode = os.stat(sock).st_ino

    def _ours(self) -> bool:
        try:
            return os.stat(self.sock).st_ino == self.inode
        except OSError:
            return False

    def watchdog(self) -> None:
        """Exit when the socket file is gone or replaced, or after ``idle_timeout`` without a message."""
        while True:
            time.sleep(0.5)
            with self.lock:
                if not self._ours():
                    os._exit(0)
                if not self.busy and time.monotonic() - self.last > self.idle_timeout:
                    for path in (self.sock, self.auth, self.sock.with_suffix(".log")):
                        with contextlib.suppress(OSError):
                            path.unlink()
                    os._exit(0)

    def handle(self, conn) -> None:
        request = conn.recv()
        if request.get("protocol") != PROTOCOL:
            conn.send({"ok": False, "reason": f"protocol {request.get('protocol')} != {PROTOCOL}"})
            return
        from flwr.app import Context

        from client import task

        self.idle_timeout = float(request.get("idle_timeout", self.idle_timeout))
        self.messages += 1
        context = Context(
            run_id=request["run_id"],
            node_id=request["node_id"],
            node_config=request["node_config"],
            state=request["state"],
            run_config=request["run_config"],
        )
        fn = task.train if request["kind"] == "train" else task.evaluate_global
        try:
            content = fn(request["content"], context)
        except Exception as exc:
            traceback.print_exc()
            conn.send({"ok": False, "error": _portable(exc)})
            return
        conn.send({"ok": True, "content": content, "state": context.state, "pid": os.getpid(),
                   "messages": self.messages})

    def serve(self) -> None:
        self.busy = True
        threading.Thread(target=self.watchdog, daemon=True).start()
        _warm_up()  # a ClientApp connecting meanwhile waits in the socket's backlog
        with self.lock:
            self.busy, self.last = False, time.monotonic()
        while True:
            try:
                conn = self.listener.accept()
            except (OSError, EOFError, AuthenticationError):
                continue
            with self.lock:
                self.busy = True
            try:
                self.handle(conn)
            except (OSError, EOFError):  # the ClientApp process went away; the next message is unaffected
                pass
            finally:
                conn.close()
                with self.lock:
                    self.busy, self.last = False, time.monotonic()


def _warm_up() -> None:
    """Import the task (torch, MONAI, shared) before the first message is taken."""
    with contextlib.suppress(Exception):
        import monai.networks.nets  # noqa: F401

        import client.task  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedmri site worker (started by the ClientApp)")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT)
    args = parser.parse_args(argv)
    _Worker(Path(args.socket), args.idle_timeout).serve()


if __name__ == "__main__":
    main()
