"""Where a ClientApp message's time goes: process start-up, imports, data, training, evaluation, serialisation.

``client.app`` imports this module first, so ``IMPORT_START`` marks the moment our code began
loading (after the interpreter and Flower's ``flwr-clientapp`` start-up). Native Flower starts a
fresh process per message; in a simulation actor only the first message pays start-up and
imports, later ones report 0 for them. The marks travel in the reply's metrics as ``time_*``
keys (seconds; ``time_process_start`` / ``time_reply`` are wall-clock) for ``bench/bench_native.py``.
"""

from __future__ import annotations

import os
import time

__all__ = ["IMPORT_START", "PROCESS_START", "Stopwatch", "imports_done", "process_marks"]

IMPORT_START = time.time()


def _process_start() -> float:
    """Wall-clock start of this process from /proc (10 ms resolution); IMPORT_START where that is unavailable."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return min(IMPORT_START, time.time() - age)
    except (OSError, ValueError, IndexError, AttributeError):
        return IMPORT_START


PROCESS_START = _process_start()
_state = {"imported": None, "first": True}


def imports_done() -> None:
    """Mark the end of our imports: ``client/app.py`` calls it after its own, ``client/task.py`` after torch, MONAI
    and ``shared``; the latest mark before this process's first measured message counts."""
    if _state["first"]:
        _state["imported"] = time.time()


class Stopwatch:
    """Laps of one message's handler; ``metrics()`` adds this process's start-up and imports to the first one."""

    def __init__(self) -> None:
        self.entered = self._last = time.time()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.time()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now

    def metrics(self) -> dict[str, float]:
        first, _state["first"] = _state["first"], False
        imported = _state["imported"] or IMPORT_START
        out = {
            "time_startup": IMPORT_START - PROCESS_START if first else 0.0,
            "time_import": imported - IMPORT_START if first else 0.0,
            "time_before_handler": self.entered - imported if first else 0.0,
            **{f"time_{k}": v for k, v in self.laps.items()},
            "time_process_start": PROCESS_START,
            "time_reply": time.time(),
        }
        return {k: float(v) for k, v in out.items()}


def process_marks(entered: float) -> dict[str, float]:
    """This process's start-up, imports and wait before a handler entered at ``entered`` (the thin ClientApp
    process in a deployment, which hands the work to the site's worker: its marks replace the worker's)."""
    imported = _state["imported"] or IMPORT_START
    return {
        "time_startup": IMPORT_START - PROCESS_START,
        "time_import": imported - IMPORT_START,
        "time_before_handler": entered - imported,
        "time_process_start": PROCESS_START,
    }
