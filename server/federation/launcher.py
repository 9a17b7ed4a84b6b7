"""Start real Flower processes on 127.0.0.1 and submit the fedmri app with ``flwr run``.

One topology for simulation, native deployment and docker-compose: a ``flower-superlink``
(with ``--simulation`` for the Simulation Engine), one ``flower-supernode`` per site in a
deployment, and ``flwr run <project> fedmri`` against a private ``FLWR_HOME``. Every process
gets its own process group and is stopped (SIGTERM, then SIGKILL) when the federation closes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = [
    "FLOWER_ENV",
    "FederationError",
    "LocalFederation",
    "flower_env",
    "free_port",
    "project_dir",
    "superlink_command",
    "supernode_command",
    "superexec_command",
    "check_reachable",
]

# Never install app dependencies at run time, never phone home.
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
# A SuperNode's flower-superexec asks for new ClientApp work every second by default; 0.1 s takes up to
# ~0.9 s off every message for one small local request per poll (bench/results/native.md).
SUPERNODE_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
CONNECTION = "fedmri"
SUPERNODE_RUNNERS = ("fedmri", "flower")
_RESERVED_PORTS = {8000, 8080}  # SuperLink's and the API's defaults


def _check_runner(runner: str) -> None:
    if runner not in SUPERNODE_RUNNERS:
        raise ValueError(f"runner must be one of {SUPERNODE_RUNNERS}, got {runner!r}")


class FederationError(RuntimeError):
    """A federation that could not start or did not complete; the message says which part failed."""


def project_dir() -> Path:
    """The fedmri project root (holds pyproject.toml with ``[tool.flwr.app]``)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise FederationError(f"no pyproject.toml in {root}: run from a fedmri checkout")
    return root


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["PYTHONUNBUFFERED"] = "1"
    # Flower starts its helpers (flower-superexec, flwr-clientapp, ...) by command name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def free_port() -> int:
    """A free loopback TCP port (never 8000 or 8080)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _RESERVED_PORTS:
            return port


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Raise FederationError unless a TCP connection to ``host:port`` succeeds."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise FederationError(f"SuperLink address must be host:port, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except OSError as exc:
        raise FederationError(f"SuperLink at {address} is not reachable: {exc.strerror or exc}") from None


def superlink_command(
    database: str = ":flwr-in-memory:",
    host: str = "127.0.0.1",
    port: int = 9093,
    simulation: bool = False,
    tls_dir: str | None = None,
    supernode_auth: bool = False,
    isolation: str | None = None,
) -> list[str]:
    """``flower-superlink`` flags (Flower 1.41: one port serves the Fleet, Control and ServerAppIo APIs).

    ``isolation="process"`` leaves the ServerApp to a separate ``flower-superexec`` (docker-compose).
    ``database``: Flower's in-memory state by default; its SQLite file (a path) costs the SuperLink ~20 s of
    SQL per 4-round native run on 2 cores and hit "database is locked" under load (fedmri keeps its own
    run log and checkpoints, so nothing needs the SuperLink's state after a run).
    """
    cmd = [
        "flower-superlink",
        "--disable-runtime-dependency-installation",
        "--database",
        database,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if tls_dir:
        cmd += [
            "--ssl-ca-certfile",
            f"{tls_dir}/ca.crt",
            "--ssl-certfile",
            f"{tls_dir}/server.pem",
            "--ssl-keyfile",
            f"{tls_dir}/server.key",
        ]
    else:
        cmd.insert(1, "--insecure")
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if isolation:
        cmd += ["--isolation", isolation]
    if simulation:
        cmd.append("--simulation")
    return cmd


def supernode_command(
    superlink: str,
    port: int,
    site: str,
    data_dir: str,
    ca_cert: str | None = None,
    auth_key: str | None = None,
    isolation: str | None = None,
    host: str | None = None,
    cpus: int | str | None = None,
    cache_dir: str | None = None,
    runner: str = "fedmri",
) -> list[str]:
    """``flower-supernode`` for one site; its data folder travels in ``--node-config``.

    ``runner="fedmri"`` runs it as ``fedmri supernode`` does (``shared/supernode.py``: Flower's SuperNode
    with a 0.2 s poll instead of its fixed 3 s idle sleep, ClientApps forked from a warm process);
    ``"flower"`` runs the stock ``flower-supernode``.

    ``port``/``host`` are the SuperNode's own runtime API (a separate ``flower-superexec`` connects
    there when ``isolation="process"``). ``cpus``: the site's CPU budget (its ClientApp's torch
    threads; a string such as compose's ``${FEDMRI_SITE_CPUS:-0}`` is kept as written); ``cache_dir``:
    where the site keeps preprocessed volumes (default ``<data-dir>/.fedmri-cache``).
    """
    node_config = f'site="{site}" data-dir="{data_dir}"'
    node_config += f" cpus={cpus if isinstance(cpus, str) else int(cpus)}" if cpus else ""
    node_config += f' cache-dir="{cache_dir}"' if cache_dir else ""
    _check_runner(runner)
    cmd = ["--superlink", superlink, "--port", str(port), "--node-config", node_config]
    cmd[:0] = ["--root-certificates", ca_cert] if ca_cert else ["--insecure"]
    cmd[:0] = ["fedmri", "supernode"] if runner == "fedmri" else ["flower-supernode"]
    if auth_key:
        cmd += ["--auth-supernode-private-key", auth_key]
    if host:
        cmd += ["--host", host]
    if isolation:
        cmd += ["--isolation", isolation]
    return cmd


def superexec_command(runtime_api: str, ca_cert: str | None = None, runner: str = "flower") -> list[str]:
    """``flower-superexec``: runs ServerApp or ClientApp processes for the SuperLink/SuperNode at ``runtime_api``.

    ``runner="fedmri"``: ``fedmri superexec`` (``shared/superexec.py``), which forks each ClientApp from a warm
    process instead of starting a fresh interpreter per message (a site's SuperExec, e.g. compose's clientapp-*).
    """
    _check_runner(runner)
    cmd = ["fedmri", "superexec"] if runner == "fedmri" else ["flower-superexec"]
    cmd += ["--runtime-api-address", runtime_api]
    return cmd + (["--root-certificates", ca_cert] if ca_cert else ["--insecure"])


class _Proc:
    """One Flower process in its own process group, its output in a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the whole group, SIGKILL what is left, reap it; children (superexec, clientapp) too."""
        self.signal_group(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.signal_group(signal.SIGKILL)  # stragglers in the group even if the leader exited
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class LocalFederation:
    """A SuperLink (and SuperNodes) on 127.0.0.1, for one or more ``flwr run`` submissions.

    Args:
        work_dir: folder for the private ``FLWR_HOME``, SuperLink state and process logs.
        sites: site name -> absolute data folder, one ``flower-supernode`` each (deployment).
            Leave empty with ``simulation=True`` to use the Simulation Engine instead.
        simulation: start the SuperLink with ``--simulation``.
        superlink: address of an existing SuperLink to submit to instead of starting one.
        echo: called with every line ``flwr run --stream`` prints.
        tls_dir: folder with ``ca.crt``, ``server.pem``, ``server.key`` (``deploy/gen-certs.sh``):
            TLS between SuperLink, SuperNodes and ``flwr``.
        supernode: ``"fedmri"`` (default: ``fedmri supernode``, Flower's SuperNode tuned for short rounds)
            or ``"flower"`` (stock ``flower-supernode``); see :func:`supernode_command`.
        auth_keys_dir: folder with ``<site>`` / ``<site>.pub`` key pairs (``deploy/gen-node-keys.sh``):
            SuperNode authentication; each site's public key is registered before it connects.
    """

    def __init__(
        self,
        work_dir: str | Path,
        sites: Mapping[str, str | Path] | None = None,
        simulation: bool = False,
        superlink: str | None = None,
        echo: Callable[[str], None] | None = None,
        tls_dir: str | Path | None = None,
        auth_keys_dir: str | Path | None = None,
        supernode: str = "fedmri",
    ) -> None:
        _check_runner(supernode)  # before any process starts
        self.supernode_runner = supernode
        self.work_dir = Path(work_dir).resolve()
        self.sites = {name: Path(path).resolve() for name, path in (sites or {}).items()}
        self.simulation = simulation
        self.external = superlink
        self.echo = echo or (lambda line: None)
        self.tls_dir = Path(tls_dir).resolve() if tls_dir else None
        self.ca_cert = str(self.tls_dir / "ca.crt") if self.tls_dir else None
        self.auth_keys_dir = Path(auth_keys_dir).resolve() if auth_keys_dir else None
        if self.auth_keys_dir and not self.tls_dir:
            raise ValueError("SuperNode authentication needs TLS: pass tls_dir too")
        server_files = ("ca.crt",) if superlink else ("ca.crt", "server.pem", "server.key")
        for path in ([self.tls_dir / n for n in server_files] if self.tls_dir else []) + (
            [self.auth_keys_dir / s for s in self.sites] if self.auth_keys_dir else []
        ):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found (deploy/gen-certs.sh and deploy/gen-node-keys.sh make them)")
        self.flwr_home = self.work_dir / "flwr-home"
        self.env = flower_env(self.flwr_home)
        self.address = superlink or ""
        self.superlink: _Proc | None = None
        self.supernodes: dict[str, _Proc] = {}
        self.identities: dict[int, str] = {}  # node id -> site, from registered keys
        self.identities_path = self.work_dir / "site-identities.json"
        self._closed = False

    # ---- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, timeout: float = 60.0) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if self.external:
            check_reachable(self.external)
        else:
            port = free_port()
            self.address = f"127.0.0.1:{port}"
            cmd = superlink_command(
                port=port,
                simulation=self.simulation,
                tls_dir=str(self.tls_dir) if self.tls_dir else None,
                supernode_auth=self.auth_keys_dir is not None,
            )
            self.superlink = _Proc("superlink", cmd, self.env, self.work_dir / "superlink.log")
            self._wait_listening(self.superlink, port, timeout)
        self._write_connection()
        self._wait_control_api(timeout)
        for site, data_dir in self.sites.items():
            if self.auth_keys_dir:  # the SuperLink only admits registered public keys
                self.identities[self.register_key(site)] = site
            self.start_supernode(site, data_dir)
        self.write_identities()

    def write_identities(self) -> None:
        """node id -> site of the registered keys, for the ServerApp (run config ``site-identities``)."""
        if self.identities:  # the ServerApp refuses replies that contradict the registered keys
            self.identities_path.write_text(json.dumps({str(k): v for k, v in self.identities.items()}) + "\n")

    def register_key(self, site: str) -> int:
        """Register ``<auth-keys-dir>/<site>.pub`` (the operator's key-to-site mapping); returns the node id
        the SuperLink gives that key: every reply from it must report ``site``."""
        res = self._flwr(
            "supernode",
            "register",
            str(self.auth_keys_dir / f"{site}.pub"),
            CONNECTION,
            "--name",
            site,
            "--format",
            "json",
        )
        start = res.stdout.find("{")  # `--format json` prints the JSON object after a status line
        try:
            return int(json.loads(res.stdout[start:])["node-id"])
        except (ValueError, KeyError, TypeError):
            pass
        raise FederationError(f"registering {site}'s key failed: {(res.stdout + res.stderr).strip()[-500:]}")

    def start_supernode(self, site: str, data_dir: Path) -> None:
        key = str(self.auth_keys_dir / site) if self.auth_keys_dir else None
        # The sites share this machine: each ClientApp gets an equal share of its cores as torch threads.
        cpus = max(1, (os.cpu_count() or 1) // max(1, len(self.sites)))
        cmd = supernode_command(
            self.address,
            free_port(),
            site,
            str(data_dir),
            ca_cert=self.ca_cert,
            auth_key=key,
            cpus=cpus,
            runner=self.supernode_runner,
        )
        self.supernodes[site] = _Proc(
            f"supernode-{site}", cmd, {**self.env, **SUPERNODE_ENV}, self.work_dir / f"supernode-{site}.log"
        )

    def kill_supernode(self, site: str) -> None:
        """Crash one site: SIGKILL its SuperNode's whole process group (fault-tolerance drills)."""
        proc = self.supernodes[site]
        proc.signal_group(signal.SIGKILL)
        proc.popen.wait(timeout=10)

    def close(self) -> None:
        """Stop every process this federation started, including helpers Flower puts in their own sessions."""
        if not self._closed:
            self._closed = True
            for proc in list(self.supernodes.values()) + ([self.superlink] if self.superlink else []):
                proc.stop()
        # flower-superexec / flwr-simulation / flwr-clientapp and the sites' warm workers (client/worker.py, detached
        # so they outlive a ClientApp process) run in new sessions; find them by our FLWR_HOME, which they inherit.
        # Every call sweeps again: a helper that was being spawned while an earlier close ran (a crash drill
        # closing from another thread) is caught by the close that follows.
        stragglers = self.leftover_pids()
        for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
            for pid in stragglers:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while (stragglers := self.leftover_pids()) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not stragglers:
                break

    def leftover_pids(self) -> set[int]:
        """Live processes started under this federation's private ``FLWR_HOME`` (empty once closed)."""
        marker = f"FLWR_HOME={self.flwr_home}".encode()
        found = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    if (entry / "stat").read_text().split(") ")[-1].split()[0] != "Z":
                        found.add(int(entry.name))
            except OSError:
                continue
        return found

    def _wait_control_api(self, timeout: float) -> None:
        """Wait until ``flwr`` commands get answers: on a loaded machine the port accepts connections
        a moment before the SuperLink serves its Control API, and an early ``flwr run`` then fails."""
        deadline = time.monotonic() + timeout
        while True:
            res = self._flwr("list", CONNECTION, "--format", "json", timeout=max(5.0, timeout))
            if res.returncode == 0:
                return
            if self.superlink is not None and not self.superlink.alive():
                raise FederationError(
                    f"superlink exited with code {self.superlink.popen.returncode}:\n{self.superlink.tail()}"
                )
            if time.monotonic() > deadline:
                raise FederationError(
                    f"SuperLink {self.address} did not answer within {timeout:.0f}s: "
                    f"{(res.stdout + res.stderr).strip()[-500:]}"
                )
            time.sleep(0.5)

    def _wait_listening(self, proc: _Proc, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise FederationError(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        raise FederationError(f"{proc.name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s:\n{proc.tail()}")

    def _write_connection(self) -> None:
        """``$FLWR_HOME/config.toml``: the one SuperLink connection ``flwr`` commands use."""
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f'address = "{self.address}"',
        ]
        lines.append(f'root-certificates = "{self.ca_cert}"' if self.ca_cert else "insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    # ---- runs -------------------------------------------------------------------------
    def _flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    def connected_nodes(self) -> list[dict]:
        """``flwr supernode list``: the SuperNodes the SuperLink knows, with their status."""
        res = self._flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            return list(json.loads(res.stdout)["nodes"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FederationError(f"flwr supernode list failed: {(res.stdout + res.stderr).strip()[-500:]}") from None

    def run_status(self, run_id: int) -> str:
        """Status of a run as the SuperLink reports it, e.g. ``finished:completed``."""
        res = self._flwr("list", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(res.stdout)["runs"]
            return str(runs[0]["status"])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            return f"unknown ({(res.stdout + res.stderr).strip()[-300:]})"

    def submit(
        self,
        run_config: Mapping,
        app_dir: str | Path | None = None,
        timeout: float = 3600,
        num_supernodes: int | None = None,
        log_path: str | Path | None = None,
    ) -> int:
        """``flwr run`` the app with ``run_config`` and stream its log until the run ends; returns the run id."""
        import tomli_w

        app = Path(app_dir) if app_dir else project_dir()
        overrides = Path(tempfile.mkstemp(prefix="run-config-", suffix=".toml", dir=self.work_dir)[1])
        run_config = dict(run_config)
        if self.identities:
            run_config["site-identities"] = str(self.identities_path)
        overrides.write_text(tomli_w.dumps(run_config))
        cmd = ["flwr", "run", str(app), CONNECTION, "--run-config", str(overrides), "--stream"]
        if self.simulation:
            n = num_supernodes or len(self.sites)
            cmd += ["--federation-config", f"num-supernodes={n} client-resources-num-cpus=1"]
        log_file = Path(log_path) if log_path else self.work_dir / "flwr-run.log"
        run_id: int | None = None
        with log_file.open("a") as out:
            proc = subprocess.Popen(
                cmd,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.work_dir,
            )
            timed_out = threading.Event()
            timer = threading.Timer(timeout, lambda: (timed_out.set(), _killpg(proc.pid)))
            timer.start()
            try:
                for line in proc.stdout:
                    out.write(line)
                    out.flush()
                    self.echo(line.rstrip("\n"))
                    if run_id is None and (m := re.search(r"Successfully started run (\d+)", line)):
                        run_id = int(m.group(1))
                proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:
                    _killpg(proc.pid)
                    proc.wait()
        if run_id is None:
            tail = log_file.read_text(errors="replace")[-1500:]
            raise FederationError(f"flwr run could not start the run (exit code {proc.returncode}):\n{tail}")
        if timed_out.is_set():
            raise FederationError(
                f"run {run_id} did not finish within {timeout:.0f}s (--timeout); the rounds checkpointed so far "
                "are kept: --resume with the same --run-name continues from the last one"
            )
        # Any other end of the stream (even a killed `flwr run`) leaves the run to the SuperLink: the caller
        # follows the run log (server.federation.run) instead of calling a running federation failed.
        return run_id

    def wait_finished(self, run_id: int, timeout: float = 30) -> str:
        """The run's final status (the log stream can end a moment before the status is written)."""
        deadline = time.monotonic() + timeout
        status = self.run_status(run_id)
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(1)
            status = self.run_status(run_id)
        return status


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
