"""Argument groups several subcommands share (model size, preprocessing, folders)."""

from __future__ import annotations

import argparse

from shared.data import DataConfig
from shared.model import NORMS, ModelConfig


def int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_tuple(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data", help="folder holding one sub-folder per site (Decathlon layout)")
    parser.add_argument("--sites", type=lambda s: [v for v in s.split(",") if v], default=None,
                        help="comma-separated site folder names (default: every site under --data)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and preprocessing")
    g.add_argument("--norm", choices=NORMS, default="instance", help="normalisation layers of the UNet")
    g.add_argument("--channels", type=int_tuple, default=ModelConfig.channels, help="UNet channels per level, e.g. 16,32,64,128")
    g.add_argument("--groups", type=int, default=ModelConfig.groups, help="groups for --norm group")
    g.add_argument("--roi", type=int_tuple, default=DataConfig.roi_size, help="training crop / sliding window, voxels")
    g.add_argument("--spacing", type=float_tuple, default=DataConfig.spacing, help="resample to this voxel size (mm)")
    g.add_argument("--batch-size", type=int, default=DataConfig.batch_size)
    g.add_argument("--zscore", action="store_true", help="z-score each input volume (ablation; IN does not need it)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--seed", type=int, default=0)


def model_config(args: argparse.Namespace) -> ModelConfig:
    channels = args.channels
    return ModelConfig(norm=args.norm, channels=channels, strides=(2,) * (len(channels) - 1), groups=args.groups)


def data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(spacing=args.spacing, roi_size=args.roi, batch_size=args.batch_size, zscore=args.zscore)
