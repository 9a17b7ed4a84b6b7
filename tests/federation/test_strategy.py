"""The site-aware strategies on real Flower messages: screening, per-site records, FedBN."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from server.federation.strategy import build_strategy, check_update, short_reason
from shared.model import build_unet, norm_parameter_names
from shared.runconfig import RunConfig


def _reply(node: int, site: str, state: dict, n: int = 2) -> Message:
    md = Metadata(
        run_id=1,
        message_id="",
        src_node_id=node,
        dst_node_id=1,
        reply_to_message_id=f"m{node}",
        group_id="1",
        created_at=time.time(),
        ttl=60,
        message_type="train",
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=state),
            "metrics": MetricRecord({"train_loss": 0.5, "num-examples": n}),
            "site": ConfigRecord({"name": site}),
        }
    )
    return Message(content, metadata=md)


def _error(node: int, reason: str) -> Message:
    md = Metadata(
        run_id=1,
        message_id="",
        src_node_id=node,
        dst_node_id=1,
        reply_to_message_id=f"m{node}",
        group_id="1",
        created_at=time.time(),
        ttl=60,
        message_type="train",
    )
    return Message(Error(code=0, reason=reason), metadata=md)


def _setup(norm: str = "instance", **cfg):
    config = RunConfig.from_run_config({"channels": "4,8", "norm": norm, **cfg})
    torch.manual_seed(0)
    net = build_unet(config.network_config())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    norm_keys = norm_parameter_names(net)
    strategy = build_strategy(
        config,
        expected_shapes={k: tuple(v.shape) for k, v in state.items()},
        norm_keys=norm_keys,
        fedbn=config.fedbn,
        expected_sites=("a", "b", "c"),
    )
    strategy.reset_round()
    return strategy, state, norm_keys


def _shifted(state: dict, delta: float) -> dict:
    return {k: (v + delta if v.is_floating_point() else v) for k, v in state.items()}


@pytest.mark.parametrize("strategy_name", ["fedavg", "fedprox", "fedadam"])
def test_nan_and_misshaped_updates_are_rejected_by_site_and_the_rest_aggregated(strategy_name, caplog):
    strategy, state, _ = _setup(strategy=strategy_name)
    if strategy_name == "fedadam":  # FedAdam needs the arrays it sent this round
        strategy.current_arrays = {k: v.numpy() for k, v in ArrayRecord(torch_state_dict=state).items()}
    key = next(iter(state))
    nan_state = {**state, key: torch.full_like(state[key], float("nan"))}
    bad_shape = {**state, key: torch.zeros(3)}
    replies = [
        _reply(1, "a", _shifted(state, 1.0)),
        _reply(2, "b", nan_state),
        _reply(3, "c", bad_shape),
        _reply(4, "d", _shifted(state, 3.0)),
    ]
    with caplog.at_level("WARNING", logger="flwr.fedmri"):
        arrays, _ = strategy.aggregate_train(1, replies)
    rejected = {r["site"]: r["reason"] for r in strategy.current["rejected"]}
    assert set(rejected) == {"b", "c"}
    assert "NaN or Inf" in rejected["b"] and "shape (3,)" in rejected["c"]
    assert "rejected update from site b" in caplog.text and "rejected update from site c" in caplog.text
    assert strategy.current["participants"] == ["a", "d"]
    merged = arrays.to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())
    if strategy_name != "fedadam":  # plain weighted mean of the two accepted updates
        torch.testing.assert_close(merged[key], state[key] + 2.0)


def test_too_few_valid_updates_keep_the_global_model():
    strategy, state, _ = _setup(**{"min-sites": 2})
    key = next(iter(state))
    arrays, metrics = strategy.aggregate_train(
        1, [_reply(1, "a", state), _reply(2, "b", {**state, key: state[key] * float("inf")})]
    )
    assert arrays is None and metrics is None
    assert strategy.current["aggregated"]["train"] is None


def test_error_replies_name_the_site_from_the_client_message():
    strategy, state, _ = _setup()
    reason = "<class 'shared.errors.InvalidSiteError'>:<'site c: site folder not found: /data/c'>"
    strategy.aggregate_train(1, [_reply(1, "a", state), _reply(2, "b", state), _error(3, reason)])
    assert strategy.current["failed"] == [
        {"site": "c", "phase": "train", "reason": "InvalidSiteError: site c: site folder not found: /data/c"}
    ]
    assert (
        short_reason("...traceback...\nException ClientAppException occurred. Message: site x: boom'>")
        == "site x: boom"
    )


def test_fedbn_keeps_norm_layers_out_of_the_global_model():
    strategy, state, norm_keys = _setup(norm="batch", fedbn=True)
    assert norm_keys and all(k in state for k in norm_keys)
    a = _shifted(state, 1.0)
    b = _shifted(state, 3.0)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, "a", a), _reply(2, "b", b)])
    assert set(arrays.keys()) == set(state) - norm_keys  # sent back to sites: shared layers only
    norm_avg = strategy.norm_state.to_torch_state_dict()  # kept apart, for complete checkpoints
    weight_key = next(k for k in sorted(norm_keys) if k.endswith("weight"))
    torch.testing.assert_close(norm_avg[weight_key], state[weight_key] + 2.0)


def test_check_update_accepts_a_clean_state():
    _, state, _ = _setup()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert check_update(ArrayRecord(torch_state_dict=state), shapes) is None
    assert "missing" in check_update(ArrayRecord(torch_state_dict=dict(list(state.items())[1:])), shapes)
    arr = {k: v.numpy() for k, v in state.items()}
    arr[next(iter(arr))] = np.full_like(arr[next(iter(arr))], np.inf)
    assert "NaN or Inf" in check_update(
        ArrayRecord(torch_state_dict={k: torch.from_numpy(v) for k, v in arr.items()}), shapes
    )
