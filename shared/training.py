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
from shared.metrics import FOREGROUND_LABELS, nanmean, per_label_metrics

__all__ = ["SiteSplit", "load_site", "discover_sites", "train_on_sites", "train_epochs", "predict_logits", "predict_labels", "evaluate", "EvalResult"]

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


def _loss():
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


def train_epochs(
    model: torch.nn.Module,
    loader,
    epochs: int = 1,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    proximal_mu: float = 0.0,
    max_steps: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """Train in place for ``epochs`` passes over ``loader``.

    ``proximal_mu > 0`` adds FedProx's ``mu/2 * ||w - w_global||^2`` against the weights the
    model had on entry. Returns ``{"train_loss", "first_loss", "steps", "seconds"}``;
    ``train_loss`` is the mean over the last epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model.to(device).train()
    loss_fn = _loss()
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    steps, first_loss, epoch_losses, start = 0, float("nan"), [], time.perf_counter()
    for _ in range(epochs):
        epoch_losses = []
        for batch in loader:
            image, label = batch["image"].to(device), batch["label"].to(device)
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
    }


@torch.no_grad()
def predict_logits(model: torch.nn.Module, image: torch.Tensor, roi_size, overlap: float = 0.25, sw_batch_size: int = 2) -> torch.Tensor:
    """Sliding-window logits for a ``(C, X, Y, Z)`` or ``(B, C, X, Y, Z)`` image.

    Windows that overhang the volume are padded by replicate, never zeros, so the input stays
    an affine image of the scanner's intensities.
    """
    from monai.inferers import sliding_window_inference

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
    return predict_logits(model, image, roi_size, **kwargs).argmax(1)[0].to(torch.uint8).cpu()


@dataclass
class EvalResult:
    """Per-case and averaged metrics. Dice/HD95 dicts are keyed by label (1, 2, 3)."""

    per_case: list[dict]
    dice: dict[int, float]
    hd95: dict[int, float]

    @property
    def mean_dice(self) -> float:
        return nanmean(self.dice.values())

    def flat(self, prefix: str = "") -> dict[str, float]:
        """Flat float metrics, e.g. ``{"dice_1": .., "hd95_2": .., "dice_mean": ..}`` (Flower MetricRecord)."""
        out = {f"{prefix}dice_{k}": v for k, v in self.dice.items()}
        out.update({f"{prefix}hd95_{k}": v for k, v in self.hd95.items()})
        out[f"{prefix}dice_mean"] = self.mean_dice
        return {k: (float(v) if math.isfinite(v) else float("nan")) for k, v in out.items()}


def evaluate(model: torch.nn.Module, cases: list[dict], cfg: DataConfig, hd95: bool = False) -> EvalResult:
    """Evaluate on whole preprocessed volumes with sliding-window inference."""
    per_case = []
    for item in make_eval_dataset(cases, cfg):
        pred = predict_labels(model, item["image"], cfg.roi_size)
        truth = torch.as_tensor(item["label"][0]).to(torch.uint8)
        m = per_label_metrics(pred, truth, hd95=hd95, spacing=cfg.spacing)
        per_case.append({"name": item.get("name", ""), **m})
    dice = {k: nanmean(c["dice"][k] for c in per_case) for k in FOREGROUND_LABELS}
    hd = {k: nanmean(c["hd95"][k] for c in per_case) for k in FOREGROUND_LABELS} if hd95 else {}
    return EvalResult(per_case, dice, hd)


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
) -> list[dict]:
    """Centralised training on the pooled training cases of ``sites`` (one site: local-only).

    ``on_epoch(epoch, stats)`` is called after every epoch; returns the per-epoch stats.
    """
    torch.manual_seed(seed)
    cases = [c for s in sites for c in s.train]
    loader = make_train_loader(cases, data_cfg, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for epoch in range(1, epochs + 1):
        stats = train_epochs(model, loader, epochs=1, optimizer=optimizer)
        stats["epoch"] = epoch
        history.append(stats)
        if on_epoch is not None:
            on_epoch(epoch, stats)
    return history
