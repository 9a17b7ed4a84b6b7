import math

import numpy as np
import pytest
import torch

from shared.metrics import per_label_metrics, prediction_agreement
from shared.model import build_unet
from shared.registry import list_models, load_model, mark_served, save_model, served_version
from shared.training import evaluate, train_epochs


@pytest.fixture(scope="module")
def trained(train_tiny):
    """A tiny IN model trained on the three tiny sites pooled, with its loss history."""
    model, history, sites, mcfg, dcfg = train_tiny("instance", epochs=8)
    return model, history, sites, dcfg, mcfg


def test_short_training_run_lowers_the_loss(trained):
    _, history, _, _, _ = trained
    first, last = history[0]["train_loss"], history[-1]["train_loss"]
    assert math.isfinite(last)
    assert last < 0.85 * first, f"loss went {first:.3f} -> {last:.3f} over {len(history)} epochs"


def test_evaluation_reports_dice_per_label(trained):
    model, _, sites, dcfg, _ = trained
    result = evaluate(model, sites[0].test, dcfg, hd95=True)
    assert len(result.per_case) == 1
    assert set(result.dice) == {1, 2, 3}
    assert 0 <= result.dice[1] <= 1 and 0 <= result.dice[2] <= 1
    assert result.dice[1] > 0.3, f"grey matter Dice {result.dice[1]:.3f} after a short run"
    flat = result.flat()
    assert "dice_mean" in flat and "hd95_1" in flat and flat["hd95_1"] > 0


def test_dice_metric_matches_a_direct_count():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (12, 12, 12))
    pred = np.where(rng.random(truth.shape) < 0.8, truth, rng.integers(0, 3, truth.shape))
    dice = per_label_metrics(pred, truth)["dice"]
    for k in (1, 2):
        direct = 2 * ((pred == k) & (truth == k)).sum() / ((pred == k).sum() + (truth == k).sum())
        assert dice[k] == pytest.approx(direct, abs=1e-6)
    assert math.isnan(dice[3]), "label absent from the truth -> NaN, not 0 or 1"
    assert prediction_agreement(pred, pred)["voxel_agreement"] == 1.0


def test_fedprox_term_keeps_weights_near_the_start(trained, tiny_data_dir):
    from shared.data import make_train_loader

    _, _, sites, dcfg, mcfg = trained
    loader = make_train_loader(sites[0].train, dcfg)
    moved = {}
    for mu in (0.0, 100.0):
        torch.manual_seed(1)
        net = build_unet(mcfg)
        start = [p.detach().clone() for p in net.parameters()]
        train_epochs(net, loader, epochs=2, lr=1e-2, proximal_mu=mu)
        moved[mu] = sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(net.parameters(), start))
    assert moved[100.0] < moved[0.0]


def test_registry_round_trip(tmp_path, trained):
    model, _, _, dcfg, mcfg = trained
    registry = tmp_path / "registry"
    assert served_version(registry) is None
    save_model(registry, "run-r001", model.state_dict(), mcfg, dcfg, round=1, strategy="fedavg")
    save_model(registry, "run-r002", model.state_dict(), mcfg, dcfg, round=2, strategy="fedavg")
    assert [m["version"] for m in list_models(registry)] == ["run-r001", "run-r002"]
    assert served_version(registry) == "run-r002"  # newest when nothing is marked
    mark_served(registry, "run-r001")
    loaded, meta = load_model(registry)
    assert meta["version"] == "run-r001" and meta["round"] == 1 and meta["model_config"]["channels"] == [8, 16, 32]
    x = torch.randn(1, 1, 32, 32, 32)
    model.eval()
    assert torch.allclose(loaded(x), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="invalid model version"):
        save_model(registry, "../escape", model.state_dict(), mcfg, dcfg)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(registry, "missing")
