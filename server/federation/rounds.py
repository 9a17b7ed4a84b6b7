"""The ServerApp's work: resume, run the strategy, log every site every round, checkpoint, serve."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from server.federation.strategy import build_strategy, resolve_eval_with_train
from shared.model import build_unet, norm_parameter_names, split_norm_state
from shared.ood import build_record, write_ood
from shared.registry import load_server_state, mark_served, resume_point, save_model, save_server_state
from shared.runconfig import RunConfig
from shared.runlog import RUN_LOG_NAME, RunLog, default_run_name, run_dir_for
from shared.training import select_checkpoint

__all__ = ["run_rounds"]

# A child of Flower's logger, so `flwr run --stream` and `flwr log` show these lines too.
log = logging.getLogger("flwr.fedmri")


def _complete_state(
    arrays: ArrayRecord, norm_state: ArrayRecord | None, reference: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Global weights (+ FedBN's averaged norm layers) in the reference dtypes, as a full state dict."""
    state = arrays.to_torch_state_dict()
    if norm_state is not None:
        state.update(norm_state.to_torch_state_dict())
    return {k: state[k].to(reference[k].dtype) if k in state else reference[k] for k in reference}


def read_identities(path: str) -> dict[int, str]:
    """Run config ``site-identities``: node id -> site, as the launcher wrote it when registering keys."""
    if not path:
        return {}
    try:
        return {int(node): str(site) for node, site in json.loads(Path(path).read_text()).items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"run config 'site-identities': cannot read {path}: {exc}") from None


def run_rounds(grid: Grid, run_config: Mapping) -> str:
    """Run (or resume) the federation described by ``run_config``; returns the served version."""
    cfg = RunConfig.from_run_config(run_config)
    if not cfg.out_dir:
        raise ValueError("run config 'out-dir' must be set to an absolute path")
    run_name = cfg.run_name or default_run_name()
    registry = Path(cfg.out_dir) / "registry"
    runlog = RunLog(run_dir_for(cfg.out_dir, run_name) / RUN_LOG_NAME)
    mcfg, dcfg = cfg.network_config(), cfg.data_config()

    torch.manual_seed(cfg.seed)  # the clients build the same initial norm layers from this seed
    reference = build_unet(mcfg).state_dict()
    norm_keys = norm_parameter_names(build_unet(mcfg))
    state, start_round, server_state = reference, 0, {}
    previous = resume_point(registry, run_name, cfg.resume)
    if previous:
        start_round, version = previous
        state = torch.load(registry / version / "model.pt", map_location="cpu", weights_only=True)
        server_state = load_server_state(registry, version)
        log.info("resuming run %s from checkpoint %s", run_name, version)
    if start_round >= cfg.num_server_rounds:
        version = f"{run_name}-r{start_round}"
        mark_served(registry, version)
        runlog.write(
            "end", run_name=run_name, status="completed", version=version, rounds=start_round, note="nothing to resume"
        )
        return version

    shared, norm = split_norm_state(state, norm_keys) if cfg.fedbn else (state, {})
    strategy = build_strategy(
        cfg,
        expected_shapes={k: tuple(v.shape) for k, v in reference.items()},
        norm_keys=norm_keys,
        fedbn=cfg.fedbn,
        expected_sites=cfg.sites,
        round_offset=start_round,
        norm_state=ArrayRecord(torch_state_dict=norm) if norm else None,
        eval_with_train=resolve_eval_with_train(cfg.eval_with_train, grid),
        poll_interval=cfg.poll_interval,
        identities=read_identities(cfg.site_identities),
    )
    restored = strategy.load_optimizer_state(server_state)
    if restored:
        log.info("restored the server optimiser's %s from %s-r%d", ", ".join(restored), run_name, start_round)
    _await_sites(grid, len(cfg.sites), grace=min(cfg.round_timeout, 120.0))
    runlog.write(
        "start",
        run_name=run_name,
        strategy=cfg.strategy,
        fedbn=cfg.fedbn,
        norm=cfg.norm,
        sites=list(cfg.sites),
        start_round=start_round + 1,
        num_rounds=cfg.num_server_rounds,
        resumed_from=f"{run_name}-r{start_round}" if start_round else None,
        restored=restored,
        config=cfg.to_run_config(),
    )
    updated_rounds: list[int] = []
    clock = {"start": time.perf_counter()}
    last: dict = {}  # the previous round's checkpoint and record; eval-with-train completes them a round later

    def write_round(entry: dict) -> None:
        save_model(registry, entry["version"], entry["state"], mcfg, dcfg, **entry["meta"])
        if strategy.ood_refs:  # what the API compares uploads with (OOD warning)
            write_ood(registry, entry["version"], build_record(strategy.ood_refs))
        if entry["server_state"]:
            save_server_state(registry, entry["version"], entry["server_state"])
        runlog.write("round", **entry["log"])

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Strategy hook after every round: log each site, checkpoint the global model."""
        if server_round == 0:
            clock["start"] = time.perf_counter()
            return None
        rnd = strategy.global_round(server_round)
        cur = strategy.current
        late = strategy.pop_early_eval()
        if late and last.get("log", {}).get("round") == rnd - 1:  # this round's train replies evaluated that model
            for name, metrics in late["sites"].items():
                last["log"]["sites"].setdefault(name, {"node_id": cur["nodes"].get(name)})["eval"] = metrics
            last["log"]["aggregated"]["eval"] = late["aggregated"]
            last["log"]["eval_late"] = True  # the same round again, now with its evaluation (latest record wins)
            write_round(last)
        full = _complete_state(arrays, strategy.norm_state, reference)
        finite = all(bool(torch.isfinite(v).all()) for v in full.values() if v.is_floating_point())
        participants = cur.get("participants", [])
        updated = cur["aggregated"].get("train") is not None
        if updated:
            updated_rounds.append(rnd)
        known = list(cfg.sites) or sorted(set(strategy.site_of.values()) | {f["site"] for f in cur["failed"]})
        missing = sorted(set(known) - set(participants))
        sites = {name: {"node_id": cur["nodes"].get(name), **info} for name, info in sorted(cur["sites"].items())}
        version = f"{run_name}-r{rnd}"
        seconds = time.perf_counter() - clock["start"]
        entry = {
            "version": version,
            "state": full,
            "server_state": strategy.optimizer_state(),
            "meta": dict(
                round=rnd,
                strategy=cfg.strategy,
                fedbn=cfg.fedbn,
                norm=cfg.norm,
                sites=participants,
                missing_sites=missing,
                metrics=sites,
                aggregated=cur["aggregated"],
                config=cfg.to_run_config(),
                run_name=run_name,
                kind="federated",
                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                updated=updated,
            ),
            "log": dict(
                run_name=run_name,
                round=rnd,
                seconds=round(seconds, 3),
                participants=participants,
                missing=missing,
                sites=sites,
                failed=cur["failed"],
                rejected=cur["rejected"],
                refused=cur["refused"],
                no_reply=cur["missing"],
                aggregated=cur["aggregated"],
                updated=updated,
                global_finite=finite,
                checkpoint=version,
            ),
        }
        write_round(entry)
        last.clear()
        last.update(entry)
        summary = "  ".join(
            f"{name}: loss {_fmt(info.get('train', {}).get('train_loss'))} "
            f"dice {_fmt(info.get('eval', {}).get('dice_mean'))}"
            for name, info in sites.items()
        )
        log.info(
            "round %d/%d (%.1fs) %s%s",
            rnd,
            cfg.num_server_rounds,
            seconds,
            summary,
            f"  missing: {','.join(missing)}" if missing else "",
        )
        clock["start"] = time.perf_counter()
        return MetricRecord({"global-finite": int(finite), "updated": int(updated)})

    strategy.start(
        grid,
        ArrayRecord(torch_state_dict=shared),
        num_rounds=cfg.num_server_rounds - start_round,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=end_of_round,
    )
    final = f"{run_name}-r{cfg.num_server_rounds}"
    if cfg.select_checkpoint == "best-val":  # federated validation Dice of held-out training cases only
        final = select_checkpoint(registry, run_name) or final
    if not updated_rounds and not start_round:
        runlog.write(
            "end",
            run_name=run_name,
            status="failed",
            version=None,
            rounds=cfg.num_server_rounds,
            reason="no round had min-sites valid updates",
        )
        raise RuntimeError(
            f"federation {run_name}: no round had {cfg.min_sites} valid site update(s); "
            f"see {runlog.path} for each site's error"
        )
    mark_served(registry, final)
    runlog.write(
        "end",
        run_name=run_name,
        status="completed",
        version=final,
        rounds=cfg.num_server_rounds,
        updated_rounds=updated_rounds,
    )
    return final


def _await_sites(grid: Grid, expected: int, grace: float) -> None:
    """Give every expected SuperNode a moment to connect, so round 1 does not start with only min-sites."""
    deadline = time.monotonic() + grace
    while expected and len(list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(1)
    connected = len(list(grid.get_node_ids()))
    if expected and connected < expected:
        log.warning("%d of %d sites connected after %.0fs; starting with those", connected, expected, grace)


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"
