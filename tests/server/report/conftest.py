"""A tiny registry with a trained instance-norm and a trained batch-norm model, and one report."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.registry import mark_served, save_model

TINY_EPOCHS = 6


@pytest.fixture(scope="session")
def trained_registry(train_tiny, tmp_path_factory) -> Path:
    """``tiny-instance`` (served) and ``tiny-batch``: same data, epochs and seed, different norm."""
    registry = tmp_path_factory.mktemp("registry")
    for norm in ("instance", "batch"):
        model, _, sites, mcfg, dcfg = train_tiny(norm, TINY_EPOCHS)
        save_model(
            registry,
            f"tiny-{norm}",
            model.state_dict(),
            mcfg,
            dcfg,
            kind="pooled",
            strategy="centralized",
            norm=norm,
            sites=[s.name for s in sites],
        )
    mark_served(registry, "tiny-instance")
    return registry


@pytest.fixture(scope="session")
def tiny_report(trained_registry, tiny_data_dir, tmp_path_factory):
    """The report of the served tiny model: k=3 affine maps, one gamma and one bias level."""
    from server.report.build import ReportOptions, generate_report

    out = tmp_path_factory.mktemp("reports") / "tiny-instance"
    options = ReportOptions(k=3, threshold=0.4, gammas=(0.5,), bias_strengths=(0.3,), n_resamples=500)
    return generate_report(trained_registry, tiny_data_dir, out, options=options)
