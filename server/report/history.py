"""Per-site Dice over rounds, read from a federation run log (JSON Lines).

Accepted record shapes (one JSON object per line; other lines are ignored and counted):

- one site per line: ``{"round": 3, "site": "hospital-a", "dice_mean": 0.81, ...}``
  (the Dice may also sit under ``"metrics"``);
- all sites per line: ``{"round": 3, "sites": {"hospital-a": {"dice_mean": 0.81}, ...}}``.

Records with an ``"event"``/``"phase"`` other than evaluation are skipped when an evaluation
record exists for the same round and site, so a per-round training metric never overwrites
the held-out one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["RoundHistory", "read_history"]

_DICE_KEYS = ("eval_dice", "dice_mean", "val_dice", "dice")
_EVAL_WORDS = ("eval", "val", "test")


@dataclass
class RoundHistory:
    """``sites[site][i]`` is that site's Dice after ``rounds[i]`` (NaN where the site did not report)."""

    rounds: list[int] = field(default_factory=list)
    sites: dict[str, list[float]] = field(default_factory=dict)
    source: str = ""
    skipped_lines: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _dice_of(metrics: dict) -> float | None:
    for key in _DICE_KEYS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _is_eval(record: dict) -> bool:
    tag = str(record.get("event", record.get("phase", "evaluate"))).lower()
    return any(word in tag for word in _EVAL_WORDS)


def read_history(path: str | Path) -> RoundHistory:
    """Parse a run log into per-site Dice per round; raises FileNotFoundError if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run log not found: {path}")
    points: dict[tuple[int, str], tuple[bool, float]] = {}
    skipped = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            round_ = int(record["round"])
        except (ValueError, KeyError, TypeError):
            skipped += 1
            continue
        if not isinstance(record, dict):
            skipped += 1
            continue
        found = []
        if isinstance(record.get("sites"), dict):
            for site, metrics in record["sites"].items():
                if isinstance(metrics, dict) and (dice := _dice_of(metrics)) is not None:
                    found.append((str(site), dice))
        elif "site" in record:
            metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else record
            if (dice := _dice_of(metrics)) is not None:
                found.append((str(record["site"]), dice))
        if not found:
            skipped += 1
            continue
        is_eval = _is_eval(record)
        for site, dice in found:
            previous = points.get((round_, site))
            if previous is None or is_eval or not previous[0]:
                points[(round_, site)] = (is_eval, dice)
    rounds = sorted({r for r, _ in points})
    names = sorted({s for _, s in points})
    sites = {s: [points.get((r, s), (False, math.nan))[1] for r in rounds] for s in names}
    return RoundHistory(rounds, sites, str(path), skipped)
