"""Per-site Dice over rounds, read from a federation run log (``run.jsonl``).

The log format is ``shared.runlog``'s; this module only reads each ``"round"`` record's
``sites[<site>]["eval"]["dice_mean"]``, the missing sites and the refused replies through its
reader, and where to find the log of a registered model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["RoundHistory", "read_history", "find_run_log"]


@dataclass
class RoundHistory:
    """``sites[site][i]`` is that site's held-out Dice after ``rounds[i]`` (NaN: no evaluation reply).

    ``missing[i]`` lists the sites whose update was not aggregated in ``rounds[i]``; ``refused[i]``
    the replies refused there because the node's site name could not be believed.
    """

    rounds: list[int] = field(default_factory=list)
    sites: dict[str, list[float]] = field(default_factory=dict)
    missing: list[list[str]] = field(default_factory=list)
    refused: list[list[dict]] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _dice(site_record) -> float:
    value = (site_record or {}).get("eval", {}) if isinstance(site_record, dict) else {}
    value = value.get("dice_mean") if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def read_history(path: str | Path) -> RoundHistory:
    """Per-site Dice per round of one run log; raises FileNotFoundError if it is missing."""
    from shared.runlog import round_records

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run log not found: {path}")
    records = [r for r in round_records(path) if isinstance(r.get("sites"), dict)]
    names = sorted({s for r in records for s in r["sites"]})
    return RoundHistory(
        rounds=[int(r["round"]) for r in records],
        sites={s: [_dice(r["sites"].get(s)) for r in records] for s in names},
        missing=[list(r.get("missing") or []) for r in records],
        refused=[list(r.get("refused") or []) for r in records],
        source=str(path),
    )


def find_run_log(meta: dict, registry: str | Path | None = None) -> Path | None:
    """The run log of a federated model: ``<runs>/federation/<run_name>/run.jsonl`` next to its registry."""
    run_name = meta.get("run_name")
    if not run_name or registry is None:
        return None
    from shared.runlog import RUN_LOG_NAME, run_dir_for

    path = run_dir_for(Path(registry).parent, str(run_name)) / RUN_LOG_NAME
    return path if path.is_file() else None
