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


def test_a_site_name_two_nodes_report_in_one_round_is_believed_once():
    strategy, state, _ = _setup()
    replies = [_reply(1, "a", _shifted(state, 1.0)), _reply(2, "a", _shifted(state, 5.0)), _reply(3, "b", state)]
    strategy.aggregate_train(1, replies)
    assert strategy.current["participants"] == ["a", "b"]
    assert [(r["site"], r["node_id"]) for r in strategy.current["refused"]] == [("a", 2)]
    assert "already reported this round by node 1" in strategy.current["refused"][0]["reason"]


def test_with_registered_keys_a_node_cannot_pose_as_another_site(caplog):
    config = RunConfig.from_run_config({"channels": "4,8", "min-sites": 1})
    _, state, norm_keys = _setup()
    strategy = build_strategy(
        config,
        expected_shapes={k: tuple(v.shape) for k, v in state.items()},
        norm_keys=norm_keys,
        fedbn=False,
        identities={1: "a", 2: "b"},
    )
    replies = [_reply(1, "a", state), _reply(2, "a", state), _reply(3, "c", state)]
    with caplog.at_level("WARNING", logger="fedmri.federation"):
        strategy.aggregate_train(1, replies)
    refused = {r["node_id"]: r["reason"] for r in strategy.current["refused"]}
    assert "reports site 'a' but its key is registered to 'b'" in refused[2]
    assert "node 3 is not registered to any site" in refused[3]
    assert strategy.current["participants"] == ["a"]
    assert "refused the reply of node 2" in caplog.text


def test_fedadam_moments_survive_a_resume_exactly():
    """A strategy rebuilt from a checkpoint (moments + round offset) aggregates round k as the original does."""
    strategy, state, _ = _setup(strategy="fedadam")
    arrays = ArrayRecord(torch_state_dict=state)

    def one_round(strat, server_round, start: dict, delta: float):
        strat.current_arrays = {k: v.numpy() for k, v in ArrayRecord(torch_state_dict=start).items()}
        merged, _ = strat.aggregate_train(
            server_round, [_reply(1, "a", _shifted(start, delta)), _reply(2, "b", _shifted(start, delta))]
        )
        return merged.to_torch_state_dict()

    after_1 = one_round(strategy, 1, arrays.to_torch_state_dict(), 0.5)
    saved = {k: v.copy() for k, v in strategy.optimizer_state().items()}
    assert {k.split("/")[0] for k in saved} == {"m_t", "v_t"}
    after_2 = one_round(strategy, 2, after_1, -0.25)

    resumed, _, _ = _setup(strategy="fedadam")
    resumed.round_offset = 1
    assert resumed.load_optimizer_state(saved) == ["m_t", "v_t"]
    again_2 = one_round(resumed, 1, after_1, -0.25)  # its first round is global round 2
    for key in after_2:
        torch.testing.assert_close(again_2[key], after_2[key])
