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


def test_max_steps_caps_optimiser_steps_exactly(trained):
    """epochs x batches > max-steps: exactly max-steps optimiser steps, not max-steps + epochs - 1."""
    from shared.data import make_train_loader
    from shared.training import planned_steps

    _, _, sites, dcfg, mcfg = trained
    loader = make_train_loader(sites[0].train, dcfg)
    per_epoch = len(loader)
    net = build_unet(mcfg)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    calls = []
    optimizer.register_step_post_hook(lambda *_: calls.append(1))
    cap = per_epoch + 1 if per_epoch > 1 else 2
    stats = train_epochs(net, loader, epochs=4, max_steps=cap, optimizer=optimizer)
    assert len(calls) == cap and stats["steps"] == cap
    assert planned_steps(loader, 4, cap) == cap and planned_steps(loader, 4) == 4 * per_epoch


def test_lr_schedules_decay_over_the_whole_federation():
    from shared.training import scheduled_lr

    assert scheduled_lr(1e-2, 0, 100, "poly") == pytest.approx(1e-2)
    assert scheduled_lr(1e-2, 50, 100, "poly") == pytest.approx(1e-2 * 0.5 ** 0.9)
    assert scheduled_lr(1e-2, 100, 100, "poly") == 0.0
    assert scheduled_lr(1e-2, 50, 100, "cosine") == pytest.approx(5e-3)
    assert scheduled_lr(1e-2, 99, 100, "constant") == 1e-2
    with pytest.raises(ValueError, match="lr schedule"):
        scheduled_lr(1e-2, 1, 10, "step")


def test_train_epochs_sets_the_round_aware_learning_rate(trained):
    """Round 3 of 4 with 2 steps per round: steps 4 and 5 of 8 on the poly curve."""
    from shared.data import make_train_loader
    from shared.training import scheduled_lr

    _, _, sites, dcfg, mcfg = trained
    loader = make_train_loader(sites[0].train, dcfg)
    net = build_unet(mcfg)
    optimizer = torch.optim.Adam(net.parameters(), lr=1.0)
    stats = train_epochs(net, loader, epochs=2, lr=3e-3, max_steps=2, optimizer=optimizer, lr_schedule="poly",
                         step_offset=4, total_steps=8)
    assert stats["lr_first"] == pytest.approx(scheduled_lr(3e-3, 4, 8, "poly"))
    assert stats["lr_last"] == pytest.approx(scheduled_lr(3e-3, 5, 8, "poly"))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(stats["lr_last"])


def test_evaluation_scores_on_the_label_files_own_grid(tmp_path):
    """A 2 x 2 x 3 mm case evaluated with a 2 mm model grid: prediction goes back to 2 x 2 x 3 mm first."""
    import nibabel as nib

    from shared.data import DataConfig, find_cases, make_eval_dataset
    from shared.training import native_case_metrics

    affine = np.diag([-2.0, 2.0, 3.0, 1.0])
    grid = np.ogrid[:30, :30, :20]
    r = np.sqrt(((grid[0] - 15) / 10.0) ** 2 + ((grid[1] - 15) / 9.0) ** 2 + ((grid[2] - 10) / 5.0) ** 2)
    labels = np.where(r < 0.4, 3, np.where(r < 0.7, 2, np.where(r < 1, 1, 0))).astype(np.uint8)
    for folder, data in (("imagesTr", labels.astype(np.float32) * 100), ("labelsTr", labels)):
        (tmp_path / "s" / folder).mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, affine), tmp_path / "s" / folder / "a.nii.gz")
    case = find_cases(tmp_path / "s")[0]
    item = make_eval_dataset([case], DataConfig(spacing=(2.0, 2.0, 2.0), cache=False))[0]
    assert item["label"].shape[1:] != labels.shape  # the model grid differs from the file's grid
    perfect = torch.nn.functional.one_hot(item["label"][0].long(), 4).permute(3, 0, 1, 2).float()
    m = native_case_metrics(perfect, item["label"].affine, case["label"], hd95=True)
    assert m["prediction"].shape == labels.shape
    assert min(m["dice"].values()) > 0.85, m["dice"]
    assert m["lesion"]["ref_lesions"] == 1 and m["lesion"]["detected"] == 1


def test_evaluation_reports_lesion_detection(trained):
    model, _, sites, dcfg, _ = trained
    result = evaluate(model, [c for s in sites for c in s.test], dcfg)
    assert {"ref_lesions", "pred_lesions", "precision", "recall", "f1"} <= set(result.detection)
    assert result.detection["n_cases"] == 3
    assert all("lesion" in c for c in result.per_case)
    flat = result.flat()
    assert {"lesion_precision", "lesion_recall", "lesion_f1"} <= set(flat)


def test_checkpoint_selection_uses_validation_scores_only(tmp_path, trained):
    from shared.training import select_checkpoint

    model, _, _, dcfg, mcfg = trained
    registry = tmp_path / "registry"
    val = {1: 0.6, 2: 0.8, 3: 0.7}
    for rnd, score in val.items():
        metrics = {"a": {"eval": {"dice_mean": score}}, "b": {"eval": {"dice_mean": score - 0.1}}}
        save_model(registry, f"run-r{rnd}", model.state_dict(), mcfg, dcfg, round=rnd, run_name="run", metrics=metrics,
                   test_dice=1.0 - score)  # a test score that would pick round 1: must be ignored
    save_model(registry, "other-r1", model.state_dict(), mcfg, dcfg, round=1, run_name="other",
               metrics={"a": {"eval": {"dice_mean": 0.99}}})
    assert select_checkpoint(registry, "run") == "run-r2"
    assert select_checkpoint(registry, "missing") is None


def test_lesion_weighted_cross_entropy_pushes_a_suppressed_lesion_harder():
    """Dice's gradient vanishes once p(lesion) ~ 0; the weighted cross-entropy term keeps pushing."""
    from shared.training import _loss

    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[0, 0, :4] = 1
    label[0, 0, 4:] = 2
    label[0, 0, 3:5, 3:5, 3:5] = 3
    logits = torch.zeros(1, 4, 8, 8, 8)
    logits[:, 3] = -8.0  # the net has learnt "never lesion"
    grads = {}
    for name, weights in (("plain", (1.0, 1.0, 1.0, 1.0)), ("weighted", (1.0, 1.0, 1.0, 10.0))):
        x = logits.clone().requires_grad_(True)
        _loss(weights)(x, label).backward()
        grads[name] = -float(x.grad[0, 3][label[0, 0] == 3].mean())
    assert grads["plain"] > 0 and grads["weighted"] > 3 * grads["plain"]
