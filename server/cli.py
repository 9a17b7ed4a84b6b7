"""`fedmri`: one console script for every task, one module per subcommand in ``server.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from shared.errors import InvalidSiteError, InvalidVolumeError

# name -> module under server.commands; each module defines HELP, add_arguments(parser), run(args).
COMMANDS = (
    "generate", "train", "federate", "serve", "report", "ablation", "pacs", "ood", "supernode", "superexec"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmri",
        description="Federated MRI segmentation with instance normalisation across hospitals.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"server.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"server.commands.{name}":
                raise
            continue  # subcommand not shipped in this build
        cmd = sub.add_parser(
            name, help=module.HELP, description=module.HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        module.add_arguments(cmd)
        # PASS_THROUGH commands wrap a Flower executable and hand it every argument they do not know.
        cmd.set_defaults(_run=module.run, _pass_through=getattr(module, "PASS_THROUGH", False))
    return parser


def quiet_gpu_probes() -> None:
    """MONAI probes NVIDIA's nvImageCodec (a GPU DICOM decoder) when monai.data is imported and warns twice
    if it is absent, i.e. on every CPU machine: not actionable, and it buried the report's own output."""
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not args._pass_through:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.flower_args = extra
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    quiet_gpu_probes()
    try:
        return int(args._run(args) or 0)
    except (InvalidSiteError, InvalidVolumeError, ValueError, FileNotFoundError) as exc:
        print(f"fedmri {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
