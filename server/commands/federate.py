"""`fedmri federate`: train one model across the sites with Flower (simulation or native processes)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from server.commands.options import add_data_dir, add_run_config_args, run_config_from_args
from shared.runconfig import CLI_GROUPS

HELP = "federated training with Flower: --mode simulation (one command) or native (SuperLink + one SuperNode per site)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_dir(parser)
    parser.add_argument(
        "--out", default="runs", help="runs folder; checkpoints go to OUT/registry, the run log to OUT/federation/NAME"
    )
    parser.add_argument(
        "--mode",
        choices=("simulation", "native"),
        default="simulation",
        help="simulation: Flower Simulation Engine; native: real flower-superlink/-supernode processes on 127.0.0.1",
    )
    parser.add_argument("--run-name", default=None, help="registry prefix / run folder (default: fed-<UTC time>)")
    parser.add_argument("--resume", action="store_true", help="continue --run-name from its last checkpoint")
    parser.add_argument(
        "--superlink",
        default=None,
        metavar="HOST:PORT",
        help="native mode: submit to this running SuperLink (e.g. docker compose's) instead of starting one",
    )
    parser.add_argument(
        "--tls-dir",
        default=None,
        metavar="DIR",
        help="native mode: TLS with DIR/{ca.crt,server.pem,server.key} from deploy/gen-certs.sh",
    )
    parser.add_argument(
        "--auth-keys-dir",
        default=None,
        metavar="DIR",
        help="native mode: SuperNode authentication with DIR/<site> keys from "
        "deploy/gen-node-keys.sh (needs --tls-dir)",
    )
    parser.add_argument(
        "--supernode",
        choices=("fedmri", "flower"),
        default="fedmri",
        help="native mode: fedmri (Flower's SuperNode with a short poll and forked ClientApps, as `fedmri "
        "supernode`) or flower (stock flower-supernode)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up on the run after this many seconds (default: rounds x 2 x round-timeout + 10 min, "
        "since the server already bounds every round; an abandoned run keeps its checkpoints: --resume)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any run-config key, e.g. --set proximal-mu=0.1 --set max-steps=20 (TOML values)",
    )
    parser.add_argument("--flower-log", action="store_true", help="also print Flower's streamed log")
    add_run_config_args(parser, CLI_GROUPS)


def _parse_set(items: list[str]) -> dict:
    import tomllib

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value  # a bare string
    return out


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "  -  "


def print_record(record: dict) -> None:
    """Terminal progress: one block per finished round, one line per site."""
    event = record.get("event")
    if event == "start":
        resumed = f", resuming after {record['resumed_from']}" if record.get("resumed_from") else ""
        print(
            f"federation {record['run_name']}: {record['strategy']}{' + FedBN' if record.get('fedbn') else ''}, "
            f"norm={record['norm']}, sites {', '.join(record.get('sites') or [])}, "
            f"rounds {record['start_round']}..{record['num_rounds']}{resumed}",
            flush=True,
        )
    elif event == "round":
        print(f"round {record['round']} ({record['seconds']:.1f}s)", flush=True)
        for site, info in record.get("sites", {}).items():
            train, ev = info.get("train", {}), info.get("eval", {})
            print(
                f"  {site:<14} loss {_fmt(train.get('train_loss'))}  Dice GM {_fmt(ev.get('dice_1'))} "
                f"WM {_fmt(ev.get('dice_2'))} lesion {_fmt(ev.get('dice_3'))} mean {_fmt(ev.get('dice_mean'))}",
                flush=True,
            )
        problems = (("failed", "failed"), ("rejected", "update rejected"), ("refused", "reply refused"),
                    ("no_reply", "no reply"))
        for key, what in problems:
            for item in record.get(key, []):
                reason = f": {item['reason']}" if item.get("reason") else ""
                print(f"  ! {item['site']} {what} ({item['phase']}){reason}", flush=True)
        if record.get("missing"):
            print(f"  missing this round: {', '.join(record['missing'])}", flush=True)
        if not record.get("updated", True):
            print("  fewer than min-sites valid updates: global model kept", flush=True)
    elif event == "end" and record.get("status") == "completed":
        print(f"done: {record['version']} (served)", flush=True)


def run(args: argparse.Namespace) -> int:
    from server.federation import FederationError, run_federation

    run_config = run_config_from_args(args)
    if args.resume:
        run_config["resume"] = True
    run_config.update(_parse_set(args.set))
    if args.superlink and args.mode != "native":
        raise ValueError("--superlink needs --mode native")
    try:
        result = run_federation(
            Path(args.data),
            Path(args.out),
            sites=args.sites,
            run_config=run_config,
            run_name=args.run_name,
            mode=args.mode,
            superlink=args.superlink,
            timeout=args.timeout,
            on_record=print_record,
            tls_dir=args.tls_dir,
            auth_keys_dir=args.auth_keys_dir,
            supernode=args.supernode,
            echo=(lambda line: print(f"  | {line}", flush=True)) if args.flower_log else None,
        )
    except FederationError as exc:
        print(f"fedmri federate: error: {exc}", file=sys.stderr)
        return 1
    print(f"model {result.version} in {result.registry} ({result.seconds:.0f}s); run log {result.log_path}")
    return 0
