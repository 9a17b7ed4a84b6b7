"""The federation run log and its format: one JSON object per line, appended as the run goes.

What a run writes, for ``out_dir`` and ``run_name``:

- ``out_dir/registry/<run-name>-r<k>/`` (``model.pt`` + ``meta.json``) after every round k, via
  ``shared.registry.save_model``; meta has ``round, strategy, fedbn, norm, sites`` (participants),
  ``missing_sites, metrics`` (per site), ``aggregated, config, run_name, time, updated``. The last
  round's checkpoint is marked served (``registry/served.json``).
- ``out_dir/federation/<run-name>/run.jsonl``: the run log, one JSON object per line. NaN/Inf
  metrics are written as ``null``. Records:

  ``{"event": "start", "time", "run_name", "strategy", "fedbn", "norm", "sites", "start_round",
  "num_rounds", "resumed_from", "restored", "config"}``  (``restored``: server optimiser state put back on resume)

  ``{"event": "round", "time", "run_name", "round": k, "seconds",
  "participants": [sites whose update was aggregated],
  "missing": [expected sites that did not contribute an update this round],
  "sites": {"<site>": {"node_id", "train": {"train_loss", "first_loss", "steps", "seconds",
  "num-examples"}, "eval": {"dice_1", "dice_2", "dice_3", "dice_mean", ["hd95_1".."hd95_3"],
  "eval_on_train", "num-examples"}}},
  "failed": [{"site", "phase": "train"|"evaluate", "reason"}],   # the site's ClientApp raised
  "refused": [{"site", "node_id", "phase", "reason"}],            # site name not believed (identity check)
  "rejected": [{"site", "phase", "reason"}],                      # NaN/Inf/wrong-shape update
  "no_reply": [{"site", "phase"}],                                # no answer (node down, timeout)
  "aggregated": {"train": {...} | null, "eval": {...} | null}, "updated": bool,
  "global_finite": bool, "checkpoint": "<run-name>-r<k>", ["eval_late": true]}``

  Train metrics also carry ``time_*`` phase timings, ``cache_hits``/``cache_built`` (the site's disk cache)
  and ``threads``; train and eval entries carry ``time_sent``/``time_arrived`` (wall clock at the server).
  With eval-with-train a round's evaluation arrives with the next round's train replies: the round is
  then written again with its ``eval`` filled in and ``"eval_late": true`` (``round_records`` keeps the
  latest record of each round).

  ``{"event": "end", "time", "run_name", "status": "completed"|"failed", "version", "rounds",
  "updated_rounds" | "reason"}``

  A resumed run appends a new ``start`` record (``resumed_from`` set) and continues the rounds;
  ``round_records(path)`` returns one record per round (the latest if a round was repeated).

  Dice labels: 1 grey matter, 2 white matter, 3 lesion (``shared.labels.LABELS``).
"""

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
