"""A site's Flower SuperNode, tuned for short rounds: a shorter idle poll and warm ClientApp starts.

Flower 1.41's SuperNode loop (``flwr.supernode.start_client_internal``) asks the SuperLink for work
and, when there is none, sleeps a fixed 3 s; while a ClientApp runs it checks for the reply every
0.5 s. Every round therefore waits 1.5 s on average before a site even starts, and up to 0.5 s more
before its reply leaves. Neither interval is a setting, so this runs Flower's own ``flower-supernode``
(same arguments, same code) with that module's sleeps capped at ``--poll-interval`` seconds — each
idle poll is one small request to the SuperLink — and, in its default ``subprocess`` isolation,
with ClientApps started by ``shared.superexec`` (forked from a warm process) instead of
``flower-superexec``. The patch points are checked at start: a Flower that no longer has them runs
unpatched, with a warning, rather than failing.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time as _time

__all__ = ["DEFAULT_POLL_INTERVAL", "OBJECT_PULL_BACKOFF", "patch_object_pulls", "patch_supernode", "run_supernode"]

log = logging.getLogger("fedmri.supernode")

DEFAULT_POLL_INTERVAL = 0.2
# First retry delay (s) of Flower's object pulls; it doubles per retry up to Flower's cap (10 s).
OBJECT_PULL_BACKOFF = 0.05


class _CappedSleepClock:
    """The ``time`` module as Flower's SuperNode loop sees it: every sleep capped at ``interval``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.interval))

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


def patch_object_pulls(initial_backoff: float = OBJECT_PULL_BACKOFF) -> bool:
    """Start Flower's object-pull retries at ``initial_backoff`` s instead of 1 s.

    A SuperNode creates the ClientApp task as soon as a message's header arrives and only then
    downloads its objects (the model); a ClientApp that asks for an object a moment too early gets
    "unavailable" and waits 1 s, then 2 s, ... Starting at 0.05 s, still doubling to Flower's 10 s cap
    with Flower's retry limit, costs a few more local requests and keeps the same total patience.
    """
    import flwr.supercore.inflatable.inflatable_utils as objects

    defaults = getattr(objects.pull_objects, "__kwdefaults__", None) or {}
    if "initial_backoff" not in defaults:
        log.warning("this Flower's pull_objects has no initial_backoff: object pulls left at Flower's backoff")
        return False
    defaults["initial_backoff"] = initial_backoff
    return True


def patch_supernode(poll_interval: float | None = DEFAULT_POLL_INTERVAL, fork_server: bool = True) -> list[str]:
    """Apply the tunings to Flower's SuperNode module in this process; returns what was applied."""
    import flwr.supernode.start_client_internal as loop

    applied = [f"object-pull backoff from {OBJECT_PULL_BACKOFF:g}s"] if patch_object_pulls() else []
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
