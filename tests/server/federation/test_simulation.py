"""Flower Simulation Engine runs of the real apps on the tiny sites (real SuperLink, Ray, ClientApps)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from server.federation import run_federation
from shared.ood import read_ood
from shared.registry import load_model, read_meta, served_version
from shared.runlog import read_run_log, round_records

from .helpers import Tracker, tiny_config

pytestmark = pytest.mark.slow

SITES = ["site-a", "site-b", "site-c"]


@pytest.fixture(scope="module")
def sim_run(tiny_data_dir, tmp_path_factory):
    """3 sites x 2 rounds, FedAvg."""
    tracker = Tracker()
    out = tmp_path_factory.mktemp("sim-runs")
    seen: list[dict] = []
    try:
        result = run_federation(
            tiny_data_dir,
            out,
            run_config=tiny_config(**{"num-server-rounds": 2}),
            run_name="sim",
            on_record=seen.append,
            on_start=tracker,
        )
        seen.append({"event": "served", "version": served_version(result.registry)})
        leftovers = tracker.leftovers()
    finally:
        tracker.cleanup()
    return result, seen, leftovers


@pytest.fixture(scope="module")
def resumed_fault_run(sim_run, tiny_data_dir):
    """The 2-round run resumed for a third round in which site-b sends a NaN update and site-x has no data folder."""
    result, _, _ = sim_run
    tracker = Tracker()
    try:
        return run_federation(
            tiny_data_dir,
            result.registry.parent,
            sites=SITES + ["site-x"],
            run_name="sim",
            run_config=tiny_config(**{"num-server-rounds": 3, "resume": True, "fault-inject": "site-b:nan"}),
            on_start=tracker,
        )
    finally:
        tracker.cleanup()


def test_simulation_writes_a_checkpoint_every_round_and_serves_the_last(sim_run):
    result, seen, leftovers = sim_run
    assert result.version == "sim-r2"
    assert seen[-1] == {"event": "served", "version": "sim-r2"}
    for rnd in (1, 2):
        meta = read_meta(result.registry, f"sim-r{rnd}")
        assert meta["round"] == rnd and meta["strategy"] == "fedavg" and meta["norm"] == "instance"
        assert meta["sites"] == SITES and meta["missing_sites"] == []
        assert set(meta["metrics"]) == set(SITES)
        assert meta["config"]["channels"] == "8,16,32" and meta["time"].endswith("Z")
    model, meta = load_model(result.registry)  # what the API will serve
    assert meta["model_config"]["channels"] == [8, 16, 32]
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 32, 32))
    assert out.shape == (1, 4, 32, 32, 32) and torch.isfinite(out).all()
    # Training moved the weights between rounds.
    r1 = torch.load(result.registry / "sim-r1" / "model.pt", weights_only=True)
    r2 = torch.load(result.registry / "sim-r2" / "model.pt", weights_only=True)
    assert any(not torch.equal(r1[k], r2[k]) for k in r1)
    assert leftovers == set()  # every Flower process it started is gone, helpers in other sessions too


def test_every_checkpoint_carries_each_sites_intensity_summary_for_the_ood_check(sim_run):
    result, _, _ = sim_run
    for rnd in (1, 2):
        record = read_ood(result.registry, f"sim-r{rnd}")
        assert record is not None and sorted(record["sites"]) == SITES
        for ref in record["sites"].values():  # aggregates only: counts, means and spreads, no volume
            assert ref["n"] >= 1 and len(ref["mean"]) == len(ref["ss"]) == len(record["features"])
        assert record["threshold"] > 0 and record["stops"]


def test_run_log_keeps_per_site_loss_and_dice_every_round(sim_run):
    result, seen, _ = sim_run
    rounds = round_records(result.log_path)
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record["participants"] == SITES and record["missing"] == [] and record["global_finite"]
        for site in SITES:
            info = record["sites"][site]
            assert math.isfinite(info["train"]["train_loss"]) and info["train"]["num-examples"] > 0
            assert {"dice_1", "dice_2", "dice_3", "dice_mean"} <= set(info["eval"])
            assert 0.0 <= info["eval"]["dice_mean"] <= 1.0
    # The progress hook saw exactly what the log holds, as it was written.
    assert [r["event"] for r in seen] == ["start", "round", "round", "end", "served"]
    assert json.loads(result.log_path.read_text().splitlines()[0])["config"]["roi-size"] == "32,32,32"
    assert result.site_dice().keys() == set(SITES)


def test_resume_continues_from_the_last_checkpoint(sim_run, resumed_fault_run, tiny_data_dir):
    result, _, _ = sim_run
    out = result.registry.parent
    with pytest.raises(ValueError, match="already has checkpoints up to round 3"):  # never overwritten silently
        run_federation(tiny_data_dir, out, run_config=tiny_config(**{"num-server-rounds": 4}), run_name="sim")
    resumed = resumed_fault_run
    assert resumed.version == "sim-r3" and served_version(out / "registry") == "sim-r3"
    starts = [r for r in read_run_log(result.log_path) if r["event"] == "start"]
    assert starts[-1]["resumed_from"] == "sim-r2" and starts[-1]["start_round"] == 3
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3]
    assert read_meta(out / "registry", "sim-r3")["round"] == 3
    r2 = torch.load(out / "registry" / "sim-r2" / "model.pt", weights_only=True)
    r3 = torch.load(out / "registry" / "sim-r3" / "model.pt", weights_only=True)
    assert any(not torch.equal(r2[k], r3[k]) for k in r2)  # round 3 trained


def test_nan_update_is_rejected_with_the_site_named_and_the_model_stays_finite(resumed_fault_run):
    fault_run = resumed_fault_run
    record = round_records(fault_run.log_path)[-1]
    assert record["round"] == 3
    assert {r["site"]: r["phase"] for r in record["rejected"]} == {"site-b": "train"}
    assert "NaN or Inf" in record["rejected"][0]["reason"]
    assert record["participants"] == ["site-a", "site-c"] and record["updated"] and record["global_finite"]
    assert "site-b" in record["missing"]
    server_log = (fault_run.run_dir / "flower.log").read_text()
    assert "rejected update from site site-b" in server_log
    state = torch.load(fault_run.registry / "sim-r3" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    # site-b still evaluated the (finite) global model.
    assert 0.0 <= record["sites"]["site-b"]["eval"]["dice_mean"] <= 1.0


def test_a_missing_site_folder_is_reported_by_name(resumed_fault_run):
    fault_run = resumed_fault_run
    record = round_records(fault_run.log_path)[-1]
    failed = [f for f in record["failed"] if f["site"] == "site-x"]
    assert {f["phase"] for f in failed} == {"train", "evaluate"}
    assert all("site folder not found" in f["reason"] and "site-x" in f["reason"] for f in failed)
    assert "site-x" in record["missing"]
    assert "site site-x failed" in (fault_run.run_dir / "flower.log").read_text()
