"""`fedmri generate`: write the demo hospitals from the MNI152 template."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

DEFAULT_OUT = {"demo": "data", "study": "data-study"}
HELP = "generate demo hospital sites (Decathlon layout) from the real MNI152 template"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=("demo", "study"),
        default="demo",
        help="demo: the demo hospitals (default); study: the harmonization study's one-factor-per-site hospitals "
        "(what `fedmri ablation` uses)",
    )
    parser.add_argument(
        "--out", default=None, help="folder to write one sub-folder per site into (default: data, data-study)"
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical files")
    parser.add_argument("--full-res", action="store_true", help="1 mm volumes (default 2 mm, small enough for CPU)")
    parser.add_argument(
        "--scale-cases", type=float, default=1.0, help="multiply every site's case counts (e.g. 0.5, 3)"
    )
    parser.add_argument("--lesion-probability", type=float, default=0.5)
    parser.add_argument("--force", action="store_true", help="regenerate sites that already exist")


def run(args: argparse.Namespace) -> int:
    from shared.synth import SITE_PRESETS, generate_site

    preset = getattr(args, "preset", "demo")
    out = Path(args.out or DEFAULT_OUT[preset])
    resolution = 1 if args.full_res else 2
    for spec in SITE_PRESETS[preset]:
        spec = dataclasses.replace(
            spec,
            n_train=max(2, round(spec.n_train * args.scale_cases)),
            n_test=max(1, round(spec.n_test * args.scale_cases)),
        )
        if resolution == 1:
            spec = dataclasses.replace(
                spec, profile=dataclasses.replace(spec.profile, spacing=tuple(v / 2 for v in spec.profile.spacing))
            )
        done = out / spec.name / "dataset.json"
        if done.is_file() and not args.force:
            print(f"{spec.name}: exists, skipped (use --force to regenerate)")
            continue
        shutil.rmtree(out / spec.name, ignore_errors=True)  # no stale cases from an earlier run
        start = time.perf_counter()
        generate_site(out, spec, seed=args.seed, resolution=resolution, lesion_probability=args.lesion_probability)
        p = spec.profile
        print(
            f"{spec.name}: {spec.n_train} train + {spec.n_test} test, s={p.scale:g} b={p.shift:g} gamma={p.gamma:g} "
            f"bias={p.bias_strength:g} spacing={p.spacing} ({time.perf_counter() - start:.1f}s)"
        )
    return 0
