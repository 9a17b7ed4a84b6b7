"""Train and evaluate one model on one or more sites: the task code the Flower apps, the
local/pooled baseline and the report all call."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shared.data import DataConfig, find_cases, make_eval_dataset, make_train_loader, split_train_val, validate_cases
from shared.labels import FOREGROUND_LABELS
from shared.metrics import lesion_detection, nanmean, per_label_metrics, summarize_detection

__all__ = [
    "SiteSplit",
    "load_site",
    "discover_sites",
    "train_on_sites",
    "train_epochs",
    "predict_logits",
    "predict_labels",
    "predict_probabilities",
    "evaluate",
    "EvalResult",
    "scheduled_lr",
    "planned_steps",
    "crop_fingerprint",
    "LR_SCHEDULES",
    "DEFAULT_LR_SCHEDULE",
]

log = logging.getLogger(__name__)


@dataclass
class SiteSplit:
    """A site's cases: training, federated validation (held out of imagesTr) and test (imagesTs)."""

    name: str
    train: list[dict]
    val: list[dict]
    test: list[dict] = field(default_factory=list)


def load_site(site_dir: str | Path, cfg: DataConfig, seed: int = 0, with_test: bool = False) -> SiteSplit:
    """Find, validate and split a site folder; raises InvalidSiteError naming the bad file."""
    cases = find_cases(site_dir, "train")
    validate_cases(cases)
    train, val = split_train_val(cases, cfg.val_fraction, seed)
    test: list[dict] = []
    if with_test:
        test = find_cases(site_dir, "test")
        validate_cases(test)
    return SiteSplit(Path(site_dir).name, train, val, test)


DEFAULT_CLASS_WEIGHTS = (1.0, 1.0, 1.0, 10.0)  # cross-entropy weight of background, GM, WM, lesion


class _DiceCE(torch.nn.Module):
    """Batch Dice + class-weighted cross-entropy, both on softmax logits (nnU-Net's loss, MONAI parts).

    Batch Dice computes each class's Dice over the whole batch, so a crop without a lesion does
    not score every faint lesion probability as a Dice of 0. Dice's gradient on a class's logit
    carries the factor ``p(1-p)`` and vanishes once the net says "never lesion" (lesions are
    ~0.1 % of a crop's voxels); cross-entropy's does not, so the lesion's cross-entropy term gets
    ``class_weights[3]``. Dice stays unweighted so tissue keeps its share of the gradient.
    """

    def __init__(self, class_weights=DEFAULT_CLASS_WEIGHTS) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(to_onehot_y=True, softmax=True, batch=True)
        weight = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.ce = torch.nn.CrossEntropyLoss(weight=weight)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, label) + self.ce(logits, label[:, 0].long())


def _loss(class_weights=DEFAULT_CLASS_WEIGHTS) -> torch.nn.Module:
    return _DiceCE(class_weights)


LR_SCHEDULES = ("constant", "poly", "cosine")
DEFAULT_LR_SCHEDULE = "poly"  # federated clients (run config ``lr-schedule``)
WINDOW_BATCH_VOXELS = 16 * 32**3  # sliding-window inference: voxels per batched forward (predict_logits)


def scheduled_lr(
    base_lr: float, step: int, total_steps: int | None, schedule: str = "constant", power: float = 0.9
) -> float:
    """Learning rate at optimiser step ``step`` (0-based) of ``total_steps`` over the whole training.

    ``"poly"`` is nnU-Net's ``base * (1 - step/total) ** 0.9``, ``"cosine"`` is
    ``base * (1 + cos(pi * step/total)) / 2``, ``"constant"`` ignores the step. In a federation
    ``step`` counts over all rounds (``(round - 1) * steps_per_round + local step``), so the
    schedule decays across the federation, not inside each round.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "constant" or not total_steps:
        return base_lr
    progress = min(max(step, 0), total_steps) / total_steps
    if schedule == "poly":
        return base_lr * (1.0 - progress) ** power
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def planned_steps(loader, epochs: int, max_steps: int | None = None) -> int:
    """Optimiser steps :func:`train_epochs` takes: ``epochs * len(loader)``, capped by ``max_steps``."""
    steps = epochs * len(loader)
    return min(steps, max_steps) if max_steps else steps


def train_epochs(
    model: torch.nn.Module,
    loader,
    epochs: int = 1,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    proximal_mu: float = 0.0,
    max_steps: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr_schedule: str = "constant",
    step_offset: int = 0,
    total_steps: int | None = None,
    class_weights=DEFAULT_CLASS_WEIGHTS,
) -> dict[str, float]:
    """Train in place for ``epochs`` passes over ``loader``, at most ``max_steps`` optimiser steps.

    ``proximal_mu > 0`` adds FedProx's ``mu/2 * ||w - w_global||^2`` against the weights the
    model had on entry. ``lr_schedule`` (:func:`scheduled_lr`) sets the learning rate of step
    ``step_offset + i`` of ``total_steps`` before each step (round-aware in a federation).
    ``class_weights`` (background, GM, WM, lesion) weight the loss terms (:func:`_loss`).
    Returns ``{"train_loss", "first_loss", "steps", "seconds", "lr_first", "lr_last",
    "crop_fingerprint"}``; ``train_loss`` is the mean over the last epoch, ``crop_fingerprint``
    a number identifying the first batch's crops (equal crops, equal number).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        max_steps = None
    model.to(device).train()
    loss_fn = _loss(class_weights)
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    steps, first_loss, epoch_losses, start = 0, float("nan"), [], time.perf_counter()
    lrs: list[float] = []
    fingerprint = float("nan")
    for _ in range(epochs):
        if max_steps is not None and steps >= max_steps:
            break
        epoch_losses = []
        for batch in loader:
            image, label = batch["image"].to(device), batch["label"].to(device)
            if steps == 0:
                fingerprint = crop_fingerprint(image)
            current_lr = scheduled_lr(lr, step_offset + steps, total_steps, lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            lrs.append(current_lr)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(image), label)
            if global_params is not None:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))
                loss = loss + proximal_mu / 2 * prox
            if not torch.isfinite(loss):
                raise FloatingPointError("training loss is not finite")
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            first_loss = value if steps == 0 else first_loss
            epoch_losses.append(value)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
    return {
        "train_loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
        "first_loss": first_loss,
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "lr_first": lrs[0] if lrs else float("nan"),
        "lr_last": lrs[-1] if lrs else float("nan"),
        "crop_fingerprint": fingerprint,
    }


def crop_fingerprint(image: torch.Tensor) -> float:
    """A float that identifies a batch of crops (position-weighted sum, so moved crops differ)."""
    flat = image.detach().reshape(-1).double()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64) % 9973
    return float((flat * weights).sum() / flat.numel())


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, image: torch.Tensor, roi_size, overlap: float = 0.25, sw_batch_size: int | None = None
) -> torch.Tensor:
    """Sliding-window logits for a ``(C, X, Y, Z)`` or ``(B, C, X, Y, Z)`` image.

    Windows that overhang the volume are padded by replicate, never zeros, so the input stays
    an affine image of the scanner's intensities. ``sw_batch_size`` (windows per forward) defaults
    to ~32^3 x 16 voxels per batch (at least 2): small windows batched amortise the per-call cost
    (instance norm is per window, so batching does not change the result beyond float noise).
    """
    from monai.inferers import sliding_window_inference

    if sw_batch_size is None:
        sw_batch_size = max(2, WINDOW_BATCH_VOXELS // math.prod(int(r) for r in roi_size))
    model.eval()
    x = image if image.ndim == 5 else image.unsqueeze(0)
    device = next(model.parameters()).device
    return sliding_window_inference(
        x.to(device=device, dtype=torch.float32),
        roi_size=tuple(roi_size),
        sw_batch_size=sw_batch_size,
        predictor=model,
        overlap=overlap,
        mode="gaussian",
        padding_mode="replicate",
    )


def predict_labels(model: torch.nn.Module, image: torch.Tensor, roi_size, **kwargs) -> torch.Tensor:
    """Label map ``(X, Y, Z)`` (uint8) for a single ``(C, X, Y, Z)`` image."""
    from shared.resample import class_argmax

    return class_argmax(predict_logits(model, image, roi_size, **kwargs)[0]).cpu()


def predict_probabilities(model: torch.nn.Module, image: torch.Tensor, roi_size, **kwargs) -> torch.Tensor:
    """Softmax class probabilities ``(classes, X, Y, Z)`` for a single ``(C, X, Y, Z)`` image."""
    return torch.softmax(predict_logits(model, image, roi_size, **kwargs), dim=1)[0].cpu()


@dataclass
class EvalResult:
    """Per-case and averaged metrics. Dice/HD95 dicts are keyed by label (1, 2, 3).

    ``detection`` pools the cases' lesion-wise detection (``shared.metrics.summarize_detection``).
    """

    per_case: list[dict]
    dice: dict[int, float]
    hd95: dict[int, float]
    detection: dict[str, float] = field(default_factory=dict)

    @property
    def mean_dice(self) -> float:
        return nanmean(self.dice.values())

    def flat(self, prefix: str = "") -> dict[str, float]:
        """Flat float metrics for a Flower MetricRecord: ``dice_1``, ``hd95_2``, ``dice_mean``, ``lesion_f1``, ..."""
        out = {f"{prefix}dice_{k}": v for k, v in self.dice.items()}
        out.update({f"{prefix}hd95_{k}": v for k, v in self.hd95.items()})
        out[f"{prefix}dice_mean"] = self.mean_dice
        for key in ("precision", "recall", "f1", "fp_volume_ml_lesion_free"):
            if key in self.detection:
                out[f"{prefix}lesion_{key}"] = self.detection[key]
        return {k: (float(v) if math.isfinite(v) else float("nan")) for k, v in out.items()}


def native_case_metrics(probabilities: torch.Tensor, model_affine, label_path: str | Path, hd95: bool = False) -> dict:
    """Metrics of one case on its label file's own grid: probabilities are resampled there first.

    Returns ``{"dice", "hd95", "lesion"}`` (``shared.metrics.per_label_metrics`` and
    ``lesion_detection`` with the label grid's voxel size) and the ``prediction`` on that grid.
    """
    from shared.io import load_volume
    from shared.resample import probabilities_to_grid, voxel_spacing

    truth, meta = load_volume(label_path)
    truth = np.rint(truth).astype(np.uint8)
    pred = probabilities_to_grid(probabilities, np.asarray(model_affine, np.float64), meta["affine"], truth.shape)
    spacing = voxel_spacing(meta["affine"])
    metrics = per_label_metrics(pred, truth, hd95=hd95, spacing=spacing)
    return {
        "dice": metrics["dice"],
        "hd95": metrics.get("hd95", {}),
        "lesion": lesion_detection(pred, truth, spacing=spacing),
        "prediction": pred,
        "meta": meta,
    }


def evaluate(model: torch.nn.Module, cases: list[dict], cfg: DataConfig, hd95: bool = False) -> EvalResult:
    """Evaluate with sliding-window inference; metrics on each case's native label grid.

    The network sees the preprocessed volume (RAS, ``cfg.spacing``); its class probabilities go
    back to the label file's grid (``shared.resample``) and are compared with the untouched labels.
    """
    per_case = []
    for case, item in zip(cases, make_eval_dataset(cases, cfg)):
        probs = predict_probabilities(model, item["image"], cfg.roi_size)
        m = native_case_metrics(probs, item["image"].affine, case["label"], hd95=hd95)
        per_case.append({"name": item.get("name", ""), "dice": m["dice"], "hd95": m["hd95"], "lesion": m["lesion"]})
    dice = {k: nanmean(c["dice"][k] for c in per_case) for k in FOREGROUND_LABELS}
    hd = {k: nanmean(c["hd95"][k] for c in per_case) for k in FOREGROUND_LABELS} if hd95 else {}
    return EvalResult(per_case, dice, hd, summarize_detection([c["lesion"] for c in per_case]))


def discover_sites(data_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """Site folders under ``data_dir`` (every sub-folder with an ``imagesTr/``), or the named ones."""
    from shared.errors import InvalidSiteError

    root = Path(data_dir)
    if names:
        return [root / n for n in names]
    sites = sorted(p for p in root.iterdir() if (p / "imagesTr").is_dir()) if root.is_dir() else []
    if not sites:
        raise InvalidSiteError(f"no site folders (with imagesTr/) under {root}; run `fedmri generate` first")
    return sites


def train_on_sites(
    sites: list[SiteSplit],
    model: torch.nn.Module,
    data_cfg: DataConfig,
    epochs: int,
    lr: float = 1e-3,
    seed: int = 0,
    on_epoch=None,
    lr_schedule: str = "constant",
    device: str | torch.device = "cpu",
    max_steps: int | None = None,
    class_weights=DEFAULT_CLASS_WEIGHTS,
) -> list[dict]:
    """Centralised training on the pooled training cases of ``sites`` (one site: local-only).

    ``on_epoch(epoch, stats)`` is called after every epoch; returns the per-epoch stats.
    ``lr_schedule`` decays the learning rate over all ``epochs`` (:func:`scheduled_lr`).
    ``max_steps`` caps the optimiser steps of the whole run (it ends inside an epoch if needed;
    the schedule then spans ``max_steps``): how the ablation matches a federation's step budget.
    """
    torch.manual_seed(seed)
    cases = [c for s in sites for c in s.train]
    loader = make_train_loader(cases, data_cfg, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * len(loader) if not max_steps else min(max_steps, epochs * len(loader))
    history, done = [], 0
    for epoch in range(1, epochs + 1):
        if done >= total:
            break
        stats = train_epochs(
            model,
            loader,
            epochs=1,
            lr=lr,
            optimizer=optimizer,
            lr_schedule=lr_schedule,
            device=device,
            max_steps=total - done,
            step_offset=done,
            total_steps=total,
            class_weights=class_weights,
        )
        done += int(stats["steps"])
        stats["epoch"] = epoch
        history.append(stats)
        if on_epoch is not None:
            on_epoch(epoch, stats)
    return history


def validation_score(meta: dict) -> float:
    """A checkpoint's federated validation score: the mean over sites of each site's mean Dice.

    Only the sites' validation cases (held out of ``imagesTr``, never ``imagesTs``) enter it,
    from the per-site ``eval`` metrics the federation records in the checkpoint's metadata.
    """
    scores = [info.get("eval", {}).get("dice_mean", float("nan")) for info in meta.get("metrics", {}).values()]
    return nanmean(v if isinstance(v, (int, float)) and v is not None else float("nan") for v in scores)


def select_checkpoint(registry: str | Path, run_name: str) -> str | None:
    """The run's ``<run-name>-r<k>`` checkpoint with the best :func:`validation_score` (later round on ties).

    Checkpoint selection never looks at test cases; ``None`` when the run has no scored checkpoint.
    """
    from shared.registry import list_models

    best: tuple[float, int, str] | None = None
    for meta in list_models(registry):
        if meta.get("run_name") != run_name or not str(meta.get("version", "")).startswith(f"{run_name}-r"):
            continue
        score = validation_score(meta)
        if math.isfinite(score):
            key = (round(score, 6), int(meta.get("round", 0)), meta["version"])
            best = key if best is None or key > best else best
    return best[2] if best else None
