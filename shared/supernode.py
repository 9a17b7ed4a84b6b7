"""A site's Flower SuperNode, tuned for short rounds: a shorter idle poll and warm ClientApp starts.

Flower 1.41's SuperNode loop (``flwr.supernode.start_client_internal``) asks the SuperLink for work
and, when there is none, sleeps a fixed 3 s; while a ClientApp runs it checks its own in-memory
state for the reply (and for the reply's objects) every 0.5 s. Every round therefore waits 1.5 s on
average before a site even starts, and up to 0.5 s more per check before its reply leaves. Neither
interval is a setting, so this runs Flower's own ``flower-supernode`` (same arguments, same code)
with that module's SuperLink polls capped at ``--poll-interval`` seconds (each is one small request
to the SuperLink) and its local checks at :data:`LOCAL_CHECK` seconds (an in-memory lookup) and, in
its default ``subprocess`` isolation, with ClientApps started by ``shared.superexec`` (forked from a
warm process) instead of ``flower-superexec``. The patch points are checked at start: a Flower that
no longer has them runs unpatched, with a warning, rather than failing.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time as _time

__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "LOCAL_CHECK",
    "OBJECT_PULL_BACKOFF",
    "OBJECT_PULL_BACKOFF_CAP",
    "patch_object_pulls",
    "patch_supernode",
    "run_supernode",
]

log = logging.getLogger("fedmri.supernode")

DEFAULT_POLL_INTERVAL = 0.2
# Seconds between the loop's checks of its own in-memory state (Flower: 0.5 s). Flower's sleeps shorter
# than _SUPERLINK_WAIT are such checks; longer ones (3 s) wait for the SuperLink (--poll-interval).
LOCAL_CHECK = 0.05
_SUPERLINK_WAIT = 1.0
# Flower's object-pull retries (a ClientApp asking its SuperNode for a message's objects before the
# SuperNode has them): first delay and cap in seconds (Flower: 1 s doubling to 10 s, 500 tries).
OBJECT_PULL_BACKOFF = 0.05
OBJECT_PULL_BACKOFF_CAP = 0.1


class _CappedSleepClock:
    """The ``time`` module as Flower's SuperNode loop sees it: a SuperLink wait capped at ``interval``,
    a check of its own state at :data:`LOCAL_CHECK`."""

    def __init__(self, interval: float) -> None:
        self.interval = interval

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.interval if seconds >= _SUPERLINK_WAIT else LOCAL_CHECK))

    def __getattr__(self, name):
        return getattr(_time, name)


class _ForkServerLauncher:
    """``subprocess`` as the SuperNode sees it: ``flower-superexec`` becomes ``python -m shared.superexec``."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(args, *rest, **kwargs):  # the name Flower calls
        if isinstance(args, list) and args[:1] == ["flower-superexec"]:
            args = [sys.executable, "-m", "shared.superexec", *args[1:]]
        return subprocess.Popen(args, *rest, **kwargs)


def patch_object_pulls(
    initial_backoff: float = OBJECT_PULL_BACKOFF, backoff_cap: float = OBJECT_PULL_BACKOFF_CAP
) -> bool:
    """Retry Flower's object pulls after ``initial_backoff`` s, doubling up to ``backoff_cap`` s.

    A SuperNode creates the ClientApp task as soon as a message's header arrives and only then
    downloads its objects (the model); a ClientApp that asks for an object a moment too early gets
    "unavailable" and, in Flower, waits 1 s, then 2 s, ... up to 10 s: a download of 0.3 s cost it
    up to 1.5 s even from 0.05 s on. Polling every ``backoff_cap`` s costs a few local requests; the
    retry limit is raised so that the total patience stays Flower's (500 tries x 10 s, 2 h max).
    """
    import flwr.supercore.inflatable.inflatable_utils as objects

    # pull_objects (the SuperNode's download) and pull_and_inflate_object_from_tree (ClientApp and
    # ServerApp message pulls, which pass their own defaults on) each carry the retry settings.
    functions = [getattr(objects, name, None) for name in ("pull_objects", "pull_and_inflate_object_from_tree")]
    every = [getattr(f, "__kwdefaults__", None) or {} for f in functions]
    if not all({"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(d) for d in every):
        log.warning("this Flower's object pulls have other retry settings: object pulls left at Flower's backoff")
        return False
    for defaults in every:
        tries, cap = defaults["max_tries_per_object"], defaults["backoff_cap"]
        if tries is not None and cap > backoff_cap:
            defaults["max_tries_per_object"] = int(tries * cap / backoff_cap)
        defaults["initial_backoff"], defaults["backoff_cap"] = initial_backoff, min(cap, backoff_cap)
    return True


def patch_supernode(poll_interval: float | None = DEFAULT_POLL_INTERVAL, fork_server: bool = True) -> list[str]:
    """Apply the tunings to Flower's SuperNode module in this process; returns what was applied."""
    import flwr.supernode.start_client_internal as loop

    applied = (
        [f"object-pull retries every {OBJECT_PULL_BACKOFF:g}-{OBJECT_PULL_BACKOFF_CAP:g}s"]
        if patch_object_pulls()
        else []
    )
    if poll_interval is not None:
        if getattr(loop, "time", None) is _time:
            loop.time = _CappedSleepClock(poll_interval)
            applied.append(f"poll-interval={poll_interval:g}s")
        else:
            log.warning("this Flower's SuperNode loop has no module-level `time`: poll interval left at Flower's")
    if fork_server:
        if getattr(loop, "subprocess", None) is subprocess:
            loop.subprocess = _ForkServerLauncher()
            applied.append("fork-server ClientApps")
        else:
            log.warning("this Flower's SuperNode has no module-level `subprocess`: flower-superexec left as is")
    return applied


def run_supernode(
    flower_args: list[str], poll_interval: float = DEFAULT_POLL_INTERVAL, fork_server: bool = True
) -> None:
    """Flower's ``flower-supernode`` with ``flower_args``, tuned as this module says (``fedmri supernode``)."""
    if not 0.01 <= poll_interval <= 3.0:
        raise ValueError(f"--poll-interval must be between 0.01 and 3 seconds, got {poll_interval:g}")
    applied = patch_supernode(poll_interval, fork_server=fork_server)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    print(f"fedmri supernode: Flower's SuperNode with {', '.join(applied) or 'no changes'}", flush=True)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
