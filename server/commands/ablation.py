"""`fedmri ablation`: the harmonization study on the one-factor-per-site hospitals (``data-study``), over seeds.

IN vs BN, FedBN and site-conditional IN (personalised and new-site rows), IN + non-linear augmentation,
Nyúl and WhiteStripe input harmonization, pooled and local baselines; paired bootstrap CIs per site.
Results go to ``--out`` and are published to ``--publish`` (bench/results) and the README's marked block.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from server.commands.options import add_data_dir, add_run_config_args, run_config_from_args
from shared.runconfig import CLI_GROUPS

STUDY_DATA = "data-study"
HELP = "train every normalisation variant with the same data and budget; write a side-by-side fairness report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from server.experiments.ablation import DEFAULT_SEEDS, DEFAULT_VARIANTS, FAST, VARIANTS

    add_data_dir(parser)
    parser.set_defaults(data=STUDY_DATA)
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
        default=DEFAULT_VARIANTS,
        help=f"comma-separated subset of {','.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})",
    )
    parser.add_argument(
        "--seeds",
        type=lambda s: tuple(int(v) for v in s.split(",") if v),
        default=DEFAULT_SEEDS,
        help="comma-separated run-config seeds; every variant runs once per seed (default 0,1,2)",
    )
    parser.add_argument(
        "--publish",
        default="bench/results",
        help="also copy ablation.{json,md,html} here and regenerate the README's ablation block from the .md "
        "('' disables)",
    )
    parser.add_argument("--readme", default="README.md", help="README whose marked ablation block is regenerated")
    parser.add_argument(
        "--no-cross-site", dest="cross_site", action="store_false", help="skip the cross-site matrix evaluation"
    )
    parser.add_argument("--note", default="", help="a line printed at the top of the results (e.g. a reduced size)")
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

    study = {"threshold": args.threshold, "sites": args.sites, "variants": args.variants, "seeds": args.seeds,
             "cross_site": args.cross_site}
    if args.k is not None:
        study["k"] = args.k
    config = AblationConfig.preset(full=args.full, run_config=run_config_from_args(args), **study)
    out = Path(args.out)
    _ensure_study_data(Path(args.data))
    results = run_ablation(args.data, out, config, mode=args.mode, note=args.note)
    print((out / "ablation.md").read_text())
    print(f"ablation: {out / 'ablation.html'} (+ .json, .csv, .md) in {results['seconds'] / 60:.1f} min")
    if args.publish:
        _publish(out, Path(args.publish), Path(args.readme))
    return 0


def _ensure_study_data(data: Path) -> None:
    """The default data folder is generated (study preset) when it holds no site yet: a clean clone just runs."""
    if data.name == STUDY_DATA and not any(data.glob("*/dataset.json")):
        from server.commands import generate

        print(f"ablation: {data} has no sites; generating the study hospitals (fedmri generate --preset study)")
        generate.run(argparse.Namespace(preset="study", out=str(data), seed=0, full_res=False, scale_cases=1.0,
                                        lesion_probability=0.5, force=False))


def _publish(out: Path, publish: Path, readme: Path) -> None:
    import shutil

    from server.report.ablation import update_readme

    publish.mkdir(parents=True, exist_ok=True)
    for ext in ("json", "md", "html"):
        shutil.copy2(out / f"ablation.{ext}", publish / f"ablation.{ext}")
    if readme.is_file() and update_readme(readme, (publish / "ablation.md").read_text()):
        print(f"ablation: {publish}/ablation.{{json,md,html}}; {readme} ablation block regenerated")
    else:
        print(f"ablation: {publish}/ablation.{{json,md,html}} (no marked ablation block in {readme})")
