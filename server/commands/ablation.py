"""`fedmri ablation`: IN vs BN vs FedBN vs GroupNorm vs z-scored BN, pooled and local baselines."""

from __future__ import annotations

import argparse
from pathlib import Path

from server.commands.options import add_data_dir, float_tuple, int_tuple

HELP = "train every normalisation variant with the same data and budget; write a side-by-side fairness report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from server.report.ablation import VARIANTS, AblationConfig

    add_data_dir(parser)
    parser.add_argument("--out", default="runs/ablation", help="writes ablation.html/.json/.csv/.md here; models under OUT/runs/")
    parser.add_argument("--full", action="store_true",
                        help="full-size run: 2 mm, 64^3 crops, channels 16,32,64,128, 20 rounds, k=5 (hours on 2 cores)")
    parser.add_argument("--variants", type=lambda s: tuple(v for v in s.split(",") if v), default=tuple(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=None, help=f"federated rounds (fast default {AblationConfig.rounds})")
    parser.add_argument("--local-epochs", type=int, default=None, help=f"epochs per site and round (fast default {AblationConfig.local_epochs})")
    parser.add_argument("--spacing", type=float_tuple, default=None, help=f"voxel size, mm (fast default {AblationConfig.spacing})")
    parser.add_argument("--roi", type=int_tuple, default=None, help=f"crop / sliding window (fast default {AblationConfig.roi_size})")
    parser.add_argument("--channels", type=int_tuple, default=None, help=f"UNet channels (fast default {AblationConfig.channels})")
    parser.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (fast default {AblationConfig.lr})")
    parser.add_argument("--k", type=int, default=None, help=f"random affine maps per test volume (fast default {AblationConfig.k})")
    parser.add_argument("--threshold", type=float, default=0.7, help="flag sites whose mean Dice is below this")
    parser.add_argument("--min-sites", type=int, default=2, help="fewest sites that must report for a federated round to count")
    parser.add_argument("--mode", choices=("simulation", "native"), default="simulation", help="Flower engine for the federated variants")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from server.report.ablation import AblationConfig, run_ablation

    given = {"rounds": args.rounds, "local_epochs": args.local_epochs, "spacing": args.spacing, "roi_size": args.roi,
             "channels": args.channels, "lr": args.lr, "k": args.k}
    overrides = {k: v for k, v in given.items() if v is not None}
    overrides.update(threshold=args.threshold, seed=args.seed, sites=args.sites, variants=args.variants, min_sites=args.min_sites)
    config = AblationConfig.full(**overrides) if args.full else AblationConfig(**overrides)
    out = Path(args.out)
    results = run_ablation(args.data, out, config, mode=args.mode)
    print((out / "ablation.md").read_text())
    print(f"ablation: {out / 'ablation.html'} (+ .json, .csv, .md) in {results['seconds'] / 60:.1f} min")
    return 0
