"""`fedmri train`: centralised training (pooled sites, or one site alone) as the baseline."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from server.commands.options import add_data_dir, add_run_config_args, run_config_from_args

HELP = "train a model without federation: all sites pooled (baseline) or --local per site"
log = logging.getLogger("fedmri.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_dir(parser)
    parser.add_argument("--out", default="runs", help="runs folder; models go to OUT/registry")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--name", default=None, help="registry version name (default: pooled-<norm> or local-<site>-<norm>)"
    )
    parser.add_argument("--local", action="store_true", help="train one model per site on that site alone")
    parser.add_argument("--serve", action="store_true", help="mark the trained model as the one the API serves")
    add_run_config_args(parser, ("model", "data", "train"))


def run(args: argparse.Namespace) -> int:
    import torch

    from shared.inferer import resolve_device
    from shared.model import build_unet
    from shared.registry import mark_served, save_model
    from shared.runconfig import RunConfig
    from shared.training import discover_sites, evaluate, load_site, train_on_sites

    cfg = RunConfig.from_run_config(run_config_from_args(args))
    torch.manual_seed(cfg.seed)
    mcfg, dcfg = cfg.network_config(), cfg.data_config()
    sites = [load_site(p, dcfg, seed=cfg.seed) for p in discover_sites(args.data, args.sites)]
    groups = [[s] for s in sites] if args.local else [sites]
    registry = Path(args.out) / "registry"
    for group in groups:
        names = [s.name for s in group]
        version = args.name or (f"local-{names[0]}-{mcfg.norm}" if args.local else f"pooled-{mcfg.norm}")
        if args.local and args.name:
            version = f"{args.name}-{names[0]}"
        log.info("training %s on %s for %d epochs", version, ",".join(names), args.epochs)
        model = build_unet(mcfg)
        history = train_on_sites(
            group,
            model,
            dcfg,
            args.epochs,
            lr=cfg.lr,
            seed=cfg.seed,
            device=resolve_device(cfg.device),
            on_epoch=lambda e, st: print(
                f"epoch {e}/{args.epochs}  loss {st['train_loss']:.4f}  ({st['seconds']:.1f}s)", flush=True
            ),
        )
        metrics = {}
        for site in sites:
            if site.val:
                result = evaluate(model, site.val, dcfg)
                metrics[site.name] = result.flat()
                print(
                    f"  val {site.name}: Dice GM {result.dice[1]:.3f} WM {result.dice[2]:.3f} "
                    f"lesion {result.dice[3]:.3f} mean {result.mean_dice:.3f}"
                )
        folder = save_model(
            registry,
            version,
            model.state_dict(),
            mcfg,
            dcfg,
            kind="local" if args.local else "pooled",
            strategy="centralized",
            norm=mcfg.norm,
            sites=names,
            epochs=args.epochs,
            history=history,
            metrics=metrics,
            config=cfg.to_run_config(),
        )
        if args.serve:
            mark_served(registry, version)
        print(f"saved {folder}")
    return 0
