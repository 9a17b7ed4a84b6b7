"""`fedmri supernode`: a hospital's Flower SuperNode with fedmri's tunings (see shared/supernode.py)."""

from __future__ import annotations

import argparse

HELP = (
    "run a site's Flower SuperNode (every flower-supernode argument is passed on) with a short idle poll "
    "and ClientApps forked from a warm process"
)
PASS_THROUGH = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from shared.supernode import DEFAULT_POLL_INTERVAL

    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL,
                        help="longest sleep of the SuperNode's loop, in s (Flower: 3 s idle, 0.5 s awaiting a reply)")
    parser.add_argument("--executor", choices=("fork", "subprocess"), default="fork",
                        help="how ClientApp processes start: forked from a pre-imported zygote, or Flower's "
                             "flower-superexec (a fresh interpreter per message); subprocess isolation only")
    parser.epilog = "Other arguments go to flower-supernode, e.g. --superlink HOST:PORT --node-config '...'."


def run(args: argparse.Namespace) -> int:
    from shared.supernode import run_supernode

    run_supernode(args.flower_args, poll_interval=args.poll_interval, fork_server=args.executor == "fork")
    return 0
