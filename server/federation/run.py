"""``run_federation``: launch Flower (simulation or native processes), follow the run log, clean up.

``run_federation(data_dir, out_dir, sites=..., run_config=..., run_name=..., mode=...)`` starts a
real ``flower-superlink`` on 127.0.0.1 (``--simulation`` in simulation mode; in native mode one
``flower-supernode`` per site, each with ``--node-config 'site="<name>" data-dir="<abs path>"'``),
submits the app with ``flwr run`` (``server.app:app`` / ``client.app:app`` from pyproject.toml),
follows the run log (format: ``shared.runlog``), and stops every process it started. Run-config
keys: ``shared.runconfig.RunConfig``. Flower's run-time dependency installation, telemetry and
update checks are always off (``launcher.FLOWER_ENV``).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.federation.launcher import FederationError, LocalFederation
from shared.registry import resume_point
from shared.runlog import RUN_LOG_NAME, default_run_name, read_run_log, round_records, run_dir_for

__all__ = ["run_federation", "run_timeout", "FederationResult", "MODES"]

START_UP_S = 600.0  # Ray / SuperLink start-up and the first round's data caching, generously

log = logging.getLogger(__name__)

MODES = ("simulation", "native")


@dataclass
class FederationResult:
    """What a finished federation produced."""

    version: str
    registry: Path
    run_dir: Path
    log_path: Path
    run_name: str
    mode: str
    seconds: float
    rounds: list[dict] = field(default_factory=list)

    def site_dice(self) -> dict[str, list[float | None]]:
        """Per-site mean Dice over rounds (None where a site did not evaluate)."""
        names = sorted({s for r in self.rounds for s in r["sites"]})
        return {s: [r["sites"].get(s, {}).get("eval", {}).get("dice_mean") for r in self.rounds] for s in names}


def _end_record(log_path: Path, start_records: int) -> dict | None:
    records = read_run_log(log_path)[start_records:]
    return next((r for r in reversed(records) if r.get("event") == "end"), None)


def _follow_to_end(federation, run_id: int, log_path: Path, start_records: int, deadline: float, echo,
                   poll: float = 2.0) -> tuple[dict | None, str]:
    """Wait for the run's ``end`` record while the SuperLink still reports the run as not finished.

    The ServerApp writes the run log whether or not anyone streams Flower's log, so a dropped
    stream is not a failed run; a run the SuperLink reports finished without an end record is.
    """
    (echo or log.warning)(f"Flower's log stream ended before run {run_id} did; following the run log until it ends")
    status = federation.run_status(run_id)
    while time.perf_counter() < deadline:
        end = _end_record(log_path, start_records)
        if end is not None:
            return end, status
        if status.startswith("finished"):
            time.sleep(poll)  # the end record is written just before the run is marked finished
            return _end_record(log_path, start_records), status
        time.sleep(poll)
        status = federation.run_status(run_id)
    return None, f"{status} (gave up after the timeout)"


def _last_error(flower_log: Path) -> str:
    """The last exception line Flower streamed (e.g. the ServerApp's), for the error message."""
    try:
        lines = flower_log.read_text(errors="replace").splitlines()
    except OSError:
        return "no Flower log"
    errors = [ln.strip() for ln in lines if re.search(r"\w+(Error|Exception): ", ln)]
    return errors[-1][:500] if errors else "no error in the Flower log"


def _follow(log_path: Path, stop: threading.Event, on_record: Callable[[dict], None], seen: int = 0) -> None:
    """Hand each record after the first ``seen`` to ``on_record`` while the run goes on."""
    while True:
        finished = stop.is_set()
        records = read_run_log(log_path)
        for record in records[seen:]:
            try:
                on_record(record)
            except Exception:  # a display problem must not stop the run's bookkeeping
                log.exception("progress display failed")
        seen = len(records)
        if finished:
            return
        stop.wait(0.5)


def run_timeout(cfg) -> float:
    """Default deadline of a whole run: every round's train and evaluate messages may each wait the
    run config's ``round-timeout`` (the ServerApp enforces that), plus start-up. A fixed hour would
    end a healthy long federation (48 rounds of a larger network take ~80 min on 2 cores)."""
    return cfg.num_server_rounds * 2 * cfg.round_timeout + START_UP_S


def run_federation(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    sites: Sequence[str] | None = None,
    run_config: Mapping | None = None,
    run_name: str | None = None,
    mode: str = "simulation",
    superlink: str | None = None,
    timeout: float | None = None,
    on_record: Callable[[dict], None] | None = None,
    echo: Callable[[str], None] | None = None,
    on_start: Callable[[LocalFederation], None] | None = None,
    tls_dir: str | Path | None = None,
    auth_keys_dir: str | Path | None = None,
    supernode: str = "fedmri",
) -> FederationResult:
    """Train one model across the sites under ``data_dir`` with Flower; see the module docstring.

    Args:
        data_dir: folder with one Decathlon-layout folder per site.
        out_dir: runs folder; checkpoints go to ``out_dir/registry``, the run log to
            ``out_dir/federation/<run-name>/run.jsonl``.
        sites: site folder names (default: every site under ``data_dir``).
        run_config: run-config overrides (kebab-case keys, see above).
        run_name: registry prefix; default ``fed-<UTC timestamp>``.
        mode: ``"simulation"`` (Flower Simulation Engine, one virtual node per site) or
            ``"native"`` (real SuperLink + one SuperNode process per site on 127.0.0.1).
        superlink: native mode only: submit to this existing SuperLink (``host:port``, insecure)
            instead of starting processes; its SuperNodes bring their own data.
        timeout: seconds before the run is abandoned (its checkpoints so far stay; ``--resume``
            continues); ``None``: :func:`run_timeout` of the run config.
        on_record: called with each run-log record as it is written (progress display).
        echo: called with every line of Flower's streamed log.
        on_start: called with the ``LocalFederation`` once its processes are up (addresses,
            process handles; fault drills stop a SuperNode through it).
        tls_dir: native mode: ``ca.crt``, ``server.pem``, ``server.key`` from ``deploy/gen-certs.sh``;
            the SuperLink serves TLS and SuperNodes / ``flwr`` verify it (with ``superlink``: ca.crt only).
        auth_keys_dir: native mode: ``<site>`` key pairs from ``deploy/gen-node-keys.sh``; enables
            SuperNode authentication (needs ``tls_dir``).
        supernode: native mode: ``"fedmri"`` (``fedmri supernode``: short poll, forked ClientApps) or
            ``"flower"`` (stock ``flower-supernode``, one fresh ClientApp interpreter per message).

    Raises:
        ValueError: a bad run-config value or mode (names the key).
        InvalidSiteError: no sites under ``data_dir``.
        FederationError: the SuperLink is unreachable, a process failed or the run did not complete.
    """
    from shared.runconfig import RunConfig
    from shared.training import discover_sites

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "simulation" and (superlink or tls_dir or auth_keys_dir):
        raise ValueError("superlink, tls_dir and auth_keys_dir apply to mode='native' only")
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    site_dirs = discover_sites(data_dir, list(sites) if sites else None) if not superlink else []
    site_names = [p.name for p in site_dirs] or list(sites or [])
    run_name = run_name or default_run_name()
    overrides = dict(run_config or {})
    # An external SuperLink's ServerApp may see the runs folder under another path (a compose volume):
    # then run_config's out-dir names it there, and out_dir is where this machine sees the same files.
    remote_out = overrides.get("out-dir") if superlink else None
    overrides.update(
        {
            "data-dir": str(data_dir),
            "out-dir": remote_out or str(out_dir),
            "run-name": run_name,
            "sites": ",".join(site_names),
        }
    )
    cfg = RunConfig.from_run_config(overrides)  # bad values fail here, before any process starts
    if cfg.min_sites > len(site_names) and site_names:
        raise ValueError(f"run config 'min-sites' = {cfg.min_sites} but only {len(site_names)} site(s)")
    resume_point(out_dir / "registry", run_name, cfg.resume)  # a name already used needs resume: fail now
    timeout = run_timeout(cfg) if timeout is None else timeout
    run_dir = run_dir_for(out_dir, run_name)
    log_path = run_dir / RUN_LOG_NAME
    run_dir.mkdir(parents=True, exist_ok=True)
    start_records = len(read_run_log(log_path))

    stop = threading.Event()
    follower, end, run_id, status = None, None, None, "unknown"
    if on_record is not None:  # hand over only the records this run writes
        follower = threading.Thread(target=_follow, args=(log_path, stop, on_record, start_records), daemon=True)
        follower.start()
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="flower-", dir=run_dir))  # process logs, SuperLink state
    if mode == "simulation":
        federation = LocalFederation(work, simulation=True, echo=echo)
    else:
        federation = LocalFederation(
            work,
            sites=None if superlink else dict(zip(site_names, site_dirs)),
            superlink=superlink,
            echo=echo,
            tls_dir=tls_dir,
            auth_keys_dir=auth_keys_dir,
            supernode=supernode,
        )
    try:
        with federation:
            if on_start is not None:
                on_start(federation)
            run_id = federation.submit(
                cfg.to_run_config(), timeout=timeout, num_supernodes=len(site_names), log_path=run_dir / "flower.log"
            )
            end = _end_record(log_path, start_records)
            if end is None:  # `flwr run --stream` can end while the run goes on (seen under load): follow it
                end, status = _follow_to_end(federation, run_id, log_path, start_records,
                                             deadline=start + timeout, echo=echo)
            if end is None or end.get("status") != "completed":  # ask the SuperLink what happened
                status = federation.wait_finished(run_id, timeout=15)
    finally:
        stop.set()
        if follower is not None:
            follower.join(timeout=5)
        shutil.rmtree(federation.flwr_home, ignore_errors=True)  # unpacked app copy; logs stay
    seconds = time.perf_counter() - start
    if end is None or end.get("status") != "completed":
        raise FederationError(
            f"federation {run_name} ({mode}) did not complete: Flower run {run_id} status {status}; "
            f"{(end or {}).get('reason') or _last_error(run_dir / 'flower.log')}. Flower log: {run_dir / 'flower.log'}"
        )
    return FederationResult(
        version=end["version"],
        registry=out_dir / "registry",
        run_dir=run_dir,
        log_path=log_path,
        run_name=run_name,
        mode=mode,
        seconds=seconds,
        rounds=round_records(log_path),
    )
