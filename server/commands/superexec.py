"""`fedmri superexec`: flower-superexec with ClientApps forked from a warm process (see shared/superexec.py)."""

from __future__ import annotations

import argparse

HELP = (
    "run a SuperExec for a SuperNode in process isolation (every flower-superexec argument is passed on), "
    "starting each ClientApp by fork from a pre-imported process"
)
PASS_THROUGH = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Arguments go to flower-superexec, e.g. --runtime-api-address HOST:9094 --insecure."


def run(args: argparse.Namespace) -> int:
    from shared.superexec import main

    main(args.flower_args)
    return 0
