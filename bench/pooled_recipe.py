"""Pooled (centralised) training on every demo site's training cases, scored on their test cases as it goes.

A quick check of a recipe or network without Flower: can it learn the tissue and the lesions at all,
and how fast per optimiser step? Prints (and appends to ``--out``) one JSON line per checkpoint:
steps, training seconds, and per site (tissue Dice = mean of GM and WM, lesion Dice over cases with a
lesion; metrics on each case's own label grid, ``shared.training.evaluate``).

Run: .venv/bin/python bench/pooled_recipe.py --steps 900 --every 300   (~3 min on 2 cores)
     .venv/bin/python bench/pooled_recipe.py --steps 600 --res-units 2 --channels 16,32,64,128 --input-norm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    import numpy as np
    import torch

    from shared.data import DataConfig, make_train_loader
    from shared.model import build_unet
    from shared.training import discover_sites, evaluate, load_site, train_epochs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO / "data"))
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--every", type=int, default=300, help="score the test cases every this many steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--channels", default="8,16,32,64")
    p.add_argument("--res-units", type=int, default=0, help="MONAI residual units per level (needs --input-norm)")
    p.add_argument("--input-norm", action="store_true", help="instance norm of the input before the UNet")
    p.add_argument("--roi", type=int, default=48)
    p.add_argument("--bias-field-prob", type=float, default=0.0)
    p.add_argument("--spatial-prob", type=float, default=0.0)
    p.add_argument("--lesion-paste-prob", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="append the JSON lines to this file")
    args = p.parse_args()
    if args.res_units and not args.input_norm:
        p.error("--res-units needs --input-norm: residual units carry the raw input past the first instance norm")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    channels = tuple(int(c) for c in args.channels.split(","))
    cfg = DataConfig(roi_size=(args.roi,) * 3, samples_per_volume=4, bias_field_prob=args.bias_field_prob,
                     spatial_prob=args.spatial_prob, lesion_paste_prob=args.lesion_paste_prob)
    sites = [load_site(s, cfg, with_test=True) for s in discover_sites(args.data)]
    loader = make_train_loader([c for s in sites for c in s.train], cfg)
    model = build_unet(channels=channels, strides=(2,) * (len(channels) - 1), num_res_units=args.res_units,
                       input_norm=args.input_norm)  # the product's ModelConfig.input_norm
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    settings = {k: v for k, v in vars(args).items() if k not in ("data", "out")}
    settings["params"] = sum(p.numel() for p in model.parameters())
    done, trained = 0, 0.0
    while done < args.steps:
        start = time.perf_counter()
        stats = train_epochs(model, loader, epochs=10**6, lr=args.lr, optimizer=optimizer, lr_schedule="poly",
                             max_steps=min(args.every, args.steps - done), step_offset=done, total_steps=args.steps)
        trained += time.perf_counter() - start
        done += int(stats["steps"])
        row = {"settings": settings, "step": done, "train_s": round(trained, 1), "loss": round(stats["train_loss"], 4)}
        for site in sites:
            result = evaluate(model, site.test, cfg)
            lesion = [c["dice"][3] for c in result.per_case if np.isfinite(c["dice"][3])]
            row[site.name] = {"tissue": round((result.dice[1] + result.dice[2]) / 2, 3),
                              "lesion": round(float(np.mean(lesion)), 3) if lesion else None}
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
