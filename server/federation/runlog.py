"""The JSONL run log: one JSON object per line, appended as the run goes (format in ``server.federation``)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

__all__ = ["RunLog", "read_run_log", "round_records", "run_dir_for", "default_run_name", "RUN_LOG_NAME"]

RUN_LOG_NAME = "run.jsonl"


def default_run_name() -> str:
    return time.strftime("fed-%Y%m%d-%H%M%S", time.gmtime())


def run_dir_for(out_dir: str | Path, run_name: str) -> Path:
    """Folder of one run (``<out>/federation/<run-name>``) holding ``run.jsonl``."""
    return Path(out_dir) / "federation" / run_name


def _clean(value):
    """JSON-safe copy: NaN/Inf become null (strict JSON has no NaN), tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


class RunLog:
    """Append-only JSONL writer; each record gets ``event`` and ``time`` (UTC ISO 8601)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields) -> dict:
        record = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
        record = _clean(record)
        with self.path.open("a") as fh:  # one line per write: a crash leaves whole records
            fh.write(json.dumps(record, sort_keys=False) + "\n")
            fh.flush()
        return record


def read_run_log(path: str | Path) -> list[dict]:
    """Every complete record of a run log (a torn last line from a crash is skipped)."""
    records = []
    p = Path(path)
    if not p.is_file():
        return records
    for line in p.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def round_records(path: str | Path) -> list[dict]:
    """The ``"round"`` records in order (the last one wins if a resumed run repeated a round)."""
    by_round = {r["round"]: r for r in read_run_log(path) if r.get("event") == "round"}
    return [by_round[k] for k in sorted(by_round)]
