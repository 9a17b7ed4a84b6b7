"""The ClientApp called as Flower calls it: a real Message and Context, a real site folder, no SuperNode.

Federation tests (tests/server/federation) run it inside real Flower processes; these pin down
what one site does with one message.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import app
from shared.errors import InvalidSiteError
from shared.model import build_unet, norm_parameter_names
from shared.runconfig import RunConfig
from shared.wire import is_packed, pack_content, unpack_record

pytestmark = pytest.mark.usefixtures("task_identity")

# The task in this process (as in a simulation); tests/client/test_worker.py hands it to the site's worker.
RUN = {"channels": "8,16,32", "roi-size": "32,32,32", "spacing": "4,4,4", "max-steps": 2, "local-epochs": 3,
       "warm-worker": False}


def _context(site_dir, **run) -> Context:
    node = {"site": site_dir.name, "data-dir": str(site_dir)}
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={**RUN, **run})


def _message(kind: str, state: dict, server_round: int = 1) -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord(torch_state_dict=state), "config": ConfigRecord({"server-round": server_round})}
    )
    return Message(content=content, dst_node_id=7, message_type=kind)


def _global_state(**run) -> dict:
    torch.manual_seed(0)
    return build_unet(RunConfig.from_run_config({**RUN, **run}).network_config()).state_dict()


@pytest.mark.slow
def test_train_returns_an_update_of_the_same_network_and_names_the_site(tiny_data_dir):
    state = _global_state()
    message = _message("train", state)
    message.content = pack_content(message.content)  # as fedmri's ServerApp sends it
    reply = app(message, _context(tiny_data_dir / "site-a"))
    assert not reply.has_error(), reply.error
    assert is_packed(reply.content["arrays"])  # the model goes back as one Array (shared.wire)
    update = unpack_record(reply.content["arrays"]).to_torch_state_dict()
    # A stock Flower ServerApp sends ordinary records and gets ordinary records back: the same update.
    stock = app(_message("train", state), _context(tiny_data_dir / "site-a"))
    assert not is_packed(stock.content["arrays"])
    assert all(torch.equal(v, update[k]) for k, v in stock.content["arrays"].to_torch_state_dict().items())
    assert {k: v.shape for k, v in update.items()} == {k: v.shape for k, v in state.items()}
    assert any(not torch.equal(update[k], state[k]) for k in state)  # it trained
    metrics = reply.content["metrics"]
    assert metrics["steps"] == 2 and metrics["num-examples"] >= 1 and metrics["train_loss"] > 0
    assert reply.content["site"]["name"] == "site-a"


@pytest.mark.slow
def test_evaluate_reports_dice_per_label_in_range(tiny_data_dir):
    reply = app(_message("evaluate", _global_state()), _context(tiny_data_dir / "site-b"))
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert all(0.0 <= metrics[f"dice_{k}"] <= 1.0 for k in (1, 2))
    assert reply.content["site"]["name"] == "site-b"


@pytest.mark.slow
def test_fedbn_keeps_the_norm_layers_at_the_site(tiny_data_dir):
    state = _global_state(norm="batch")
    context = _context(tiny_data_dir / "site-a", norm="batch", fedbn=True)
    reply = app(_message("train", state), context)
    assert not reply.has_error(), reply.error
    norm_keys = norm_parameter_names(build_unet(RunConfig.from_run_config({**RUN, "norm": "batch"}).network_config()))
    kept = [k for k in context.state.keys() if "norm" in k.lower() or "fedbn" in k.lower()]
    assert kept, "FedBN stored nothing at the site"
    local = context.state[kept[0]].to_torch_state_dict()
    assert set(local) == norm_keys


# The SuperNode turns what the app raises into an error reply whose reason reaches the server log.
def test_a_node_without_its_data_folder_fails_with_the_site_named_and_creates_nothing(tmp_path):
    missing = tmp_path / "hospital-z"
    with pytest.raises(InvalidSiteError, match="site hospital-z: site folder not found"):
        app(_message("train", _global_state()), _context(missing))
    assert not missing.exists()


def test_a_bad_run_config_fails_with_the_key_named(tiny_data_dir):
    with pytest.raises(ValueError, match="'strategy'"):
        app(_message("train", _global_state()), _context(tiny_data_dir / "site-a", strategy="fedsgd"))
