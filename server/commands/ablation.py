"""`fedmri ablation`: IN vs BN vs FedBN vs GroupNorm vs z-scored BN, pooled and local baselines."""

from __future__ import annotations

import argparse
from pathlib import Path

from server.commands.options import add_data_dir, add_run_config_args, run_config_from_args
from shared.runconfig import CLI_GROUPS

HELP = "train every normalisation variant with the same data and budget; write a side-by-side fairness report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from server.experiments.ablation import FAST, VARIANTS

    add_data_dir(parser)
    parser.add_argument(
        "--out", default="runs/ablation", help="writes ablation.html/.json/.csv/.md here; models under OUT/runs/"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="full-size preset: 2 mm, 64^3 crops, channels 16,32,64,128, 20 rounds, k=5 "
        "(hours on 2 cores); run-config flags still override it",
    )
    parser.add_argument(
        "--variants",
        type=lambda s: tuple(v for v in s.split(",") if v),
        default=tuple(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    parser.add_argument("--k", type=int, default=None, help="random affine maps per test volume (fast 2, full 5)")
    parser.add_argument("--threshold", type=float, default=0.7, help="flag sites whose mean Dice is below this")
    parser.add_argument(
        "--mode",
        choices=("simulation", "native"),
        default="simulation",
        help="Flower engine for the federated variants",
    )
    add_run_config_args(parser, CLI_GROUPS, defaults=FAST)


def run(args: argparse.Namespace) -> int:
    from server.experiments.ablation import AblationConfig, run_ablation

    study = {"threshold": args.threshold, "sites": args.sites, "variants": args.variants}
    if args.k is not None:
        study["k"] = args.k
    config = AblationConfig.preset(full=args.full, run_config=run_config_from_args(args), **study)
    out = Path(args.out)
    results = run_ablation(args.data, out, config, mode=args.mode)
    print((out / "ablation.md").read_text())
    print(f"ablation: {out / 'ablation.html'} (+ .json, .csv, .md) in {results['seconds'] / 60:.1f} min")
    return 0
