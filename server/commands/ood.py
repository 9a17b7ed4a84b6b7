"""`fedmri ood`: give a registered model its OOD reference (``ood.json``) from site folders.

In a federation each site computes its reference from its own training volumes and sends only
the aggregates (``shared.ood.site_reference``); this command does the same per site folder for
a model trained before that existed, or with ``fedmri train``, where the data is at hand.
"""

from __future__ import annotations

import argparse

HELP = "compute each site's aggregate intensity summary and store it with a model as its OOD reference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data", help="folder of site folders (each with imagesTr/)")
    parser.add_argument(
        "--sites", default=None, help="comma-separated site folder names; none: every site under --data"
    )
    parser.add_argument("--registry", default="runs/registry", help="model registry folder")
    parser.add_argument("--model", default=None, help="registry version; none: the served model")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shared.ood import build_record, site_reference_from_dir, write_ood
    from shared.registry import served_version

    version = args.model or served_version(args.registry)
    if version is None:
        raise FileNotFoundError(f"no model registered in {args.registry}")
    root = Path(args.data)
    names = args.sites.split(",") if args.sites else sorted(p.name for p in root.iterdir() if (p / "imagesTr").is_dir())
    if not names:
        raise FileNotFoundError(f"no site folders with imagesTr/ under {root}")
    sites = {name: site_reference_from_dir(root / name) for name in names}
    record = build_record(sites)
    path = write_ood(args.registry, version, record)
    for name, ref in sites.items():
        print(f"{name}: {ref['n']} training volumes")
    gamma = ", ".join(f"{s['level']:g}: {s['score']:.2f}" for s in record["stops"] if s["kind"] == "gamma")
    bias = ", ".join(f"{s['level']:g}: {s['score']:.2f}" for s in record["stops"] if s["kind"] == "bias")
    print(f"threshold {record['threshold']:g} ({record['threshold_rule']})")
    print(f"scores of the report's stop levels: gamma {gamma}; bias field {bias}")
    print(f"wrote {path}")
    return 0
