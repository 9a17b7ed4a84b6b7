"""Small builders shared by the federation tests (tiny model, 4 mm sites)."""

from __future__ import annotations

# The conftest's tiny sites: 32^3 crops at 4 mm and a three-level UNet keep a round to seconds.
TINY_RUN_CONFIG = {
    "roi-size": "32,32,32",
    "spacing": "4,4,4",
    "channels": "8,16,32",
    "samples-per-volume": 1,
    "min-sites": 2,
}


def tiny_config(**overrides) -> dict:
    return {**TINY_RUN_CONFIG, **{k.replace("_", "-"): v for k, v in overrides.items()}}


class Tracker:
    """``on_start`` hook that keeps the federation, to check afterwards that none of its processes survive."""

    def __init__(self) -> None:
        self.federations = []

    def __call__(self, federation) -> None:
        self.federations.append(federation)

    def leftovers(self) -> set[int]:
        return set().union(*(f.leftover_pids() for f in self.federations))

    def cleanup(self) -> None:
        for f in self.federations:
            f.close()
