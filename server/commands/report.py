"""`fedmri report`: per-site fairness and invariance report of a registered model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from server.commands.options import add_data_dir, float_tuple

HELP = "evaluate a registered model on every site's test cases; write an HTML/JSON/CSV fairness report"
log = logging.getLogger("fedmri.report")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that change what the report measures (shared with `fedmri ablation`)."""
    from server.report.invariance import DEFAULT_BIAS_STRENGTHS, DEFAULT_GAMMAS

    parser.add_argument(
        "--k", type=int, default=5, help="random affine maps s*x+b per test volume (0: skip the certificate)"
    )
    parser.add_argument("--threshold", type=float, default=0.7, help="flag sites whose mean Dice is below this")
    parser.add_argument("--gammas", type=float_tuple, default=DEFAULT_GAMMAS, help="gamma levels for 'where IN stops'")
    parser.add_argument(
        "--bias-strengths",
        type=float_tuple,
        default=DEFAULT_BIAS_STRENGTHS,
        help="bias field amplitudes for 'where IN stops'",
    )
    parser.add_argument("--no-stops", action="store_true", help="skip the gamma/bias checks (faster)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% intervals")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_dir(parser)
    parser.add_argument("--registry", default="runs/registry", help="model registry folder")
    parser.add_argument("--model", default=None, help="registry version (default: the served model)")
    parser.add_argument("--out", default="runs/reports", help="reports folder; the report goes to OUT/<version>/")
    parser.add_argument(
        "--run-log",
        default=None,
        help="federation run log (JSONL) for the per-round history (default: the one recorded with the model)",
    )
    parser.add_argument("--no-predictions", action="store_true", help="do not save predicted label maps")
    parser.add_argument("--seed", type=int, default=0)
    add_report_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from server.report.build import ReportOptions, generate_report
    from shared.registry import served_version

    version = args.model or served_version(args.registry)
    if version is None:
        raise FileNotFoundError(
            f"no model registered in {args.registry}; run `fedmri train` or `fedmri federate` first"
        )
    options = ReportOptions(
        k=args.k,
        threshold=args.threshold,
        seed=args.seed,
        n_resamples=args.bootstrap,
        sites=args.sites,
        gammas=() if args.no_stops else args.gammas,
        bias_strengths=() if args.no_stops else args.bias_strengths,
        save_predictions=not args.no_predictions,
        run_log=args.run_log,
    )
    result = generate_report(args.registry, args.data, Path(args.out) / version, version=version, options=options)
    report = result.report
    for skip in report["skipped"]:
        print(f"skipped {skip['site']}: {skip['error']}")
    for row in report["sites"]:
        d = row["dice"]["mean"]
        print(
            f"{row['site']}: {row['n_cases']} cases, mean Dice {d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}], "
            f"affine invariance min {row['invariance']['dice_min']:.4f}{'  FLAGGED' if row['flagged'] else ''}"
        )
    f = report["fairness"]
    if f["worst_site"] is not None:
        print(
            f"worst site {f['worst_site']} ({f['worst']:.3f}), gap {f['gap']:.3f}, ratio {f['ratio']:.3f}, "
            f"std {f['std']:.3f}, flagged: {', '.join(f['flagged']) or 'none'}"
        )
    t = report["fairness_tissue"]
    if t["worst_site"] is not None:
        print(
            f"tissue Dice (GM+WM): worst site {t['worst_site']} ({t['worst']:.3f}), gap {t['gap']:.3f}, "
            f"ratio {t['ratio']:.3f}, flagged: {', '.join(t['flagged']) or 'none'}"
        )
    print(f"invariance score {report['invariance']['score']:.4f} (min {report['invariance']['dice_min']:.4f})")
    print(f"report: {result.files['html']}  (+ report.json, report.csv, sites.csv)")
    return 0 if report["sites"] else 1
