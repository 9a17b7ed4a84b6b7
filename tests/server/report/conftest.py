"""A tiny registry with a trained instance-norm and a trained batch-norm model, and one report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.data import DataConfig
from shared.model import ModelConfig, build_unet
from shared.registry import mark_served, save_model
from shared.training import discover_sites, load_site, train_on_sites

TINY_EPOCHS = 6


def _tiny_configs(norm: str) -> tuple[ModelConfig, DataConfig]:
    # Same sizes as tests/conftest.py's tiny_model_config / tiny_data_config (those are function-scoped).
    return (ModelConfig(norm=norm, channels=(8, 16, 32), strides=(2, 2)),
            DataConfig(spacing=(4.0, 4.0, 4.0), roi_size=(32, 32, 32), batch_size=2, samples_per_volume=2, val_fraction=0.34))


@pytest.fixture(scope="session")
def trained_registry(tiny_data_dir, tmp_path_factory) -> Path:
    """``tiny-instance`` (served) and ``tiny-batch``: same data, epochs and seed, different norm."""
    registry = tmp_path_factory.mktemp("registry")
    for norm in ("instance", "batch"):
        mcfg, dcfg = _tiny_configs(norm)
        torch.manual_seed(0)
        model = build_unet(mcfg)
        sites = [load_site(p, dcfg) for p in discover_sites(tiny_data_dir)]
        train_on_sites(sites, model, dcfg, TINY_EPOCHS, lr=3e-3, seed=0)
        save_model(registry, f"tiny-{norm}", model.state_dict(), mcfg, dcfg, kind="pooled", strategy="centralized",
                   norm=norm, sites=[s.name for s in sites])
    mark_served(registry, "tiny-instance")
    return registry


@pytest.fixture(scope="session")
def tiny_report(trained_registry, tiny_data_dir, tmp_path_factory):
    """The report of the served tiny model: k=3 affine maps, one gamma and one bias level."""
    from server.report.build import ReportOptions, generate_report

    out = tmp_path_factory.mktemp("reports") / "tiny-instance"
    options = ReportOptions(k=3, threshold=0.4, gammas=(0.5,), bias_strengths=(0.3,), n_resamples=500)
    return generate_report(trained_registry, tiny_data_dir, out, options=options)
