"""Fixtures shared by every test: tiny real sites (4 mm MNI152 subjects) and tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.data import DataConfig
from shared.model import ModelConfig
from shared.scanner import ScannerProfile
from shared.synth import SiteSpec, generate_sites

TINY_SPACING = (4.0, 4.0, 4.0)

# Three scanners as different as the demo's; 4 mm volumes (50x59x48) keep tests fast on 2 cores.
TINY_SITES = (
    SiteSpec("site-a", ScannerProfile(scale=1.0, shift=0.0, spacing=TINY_SPACING), n_train=3, n_test=1),
    SiteSpec("site-b", ScannerProfile(scale=4.0, shift=-300.0, spacing=TINY_SPACING), n_train=3, n_test=1),
    SiteSpec("site-c", ScannerProfile(scale=0.25, shift=500.0, gamma=0.7, bias_strength=0.2,
                                      noise_std=0.01, spacing=TINY_SPACING), n_train=2, n_test=1),
)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A data folder with three real NIfTI sites in the Decathlon layout (made once per session)."""
    root = tmp_path_factory.mktemp("data")
    generate_sites(root, TINY_SITES, seed=0, resolution=4, lesion_probability=0.7)
    return root


@pytest.fixture
def tiny_data_config() -> DataConfig:
    return DataConfig(spacing=TINY_SPACING, roi_size=(32, 32, 32), batch_size=2, samples_per_volume=2, val_fraction=0.34)


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    return ModelConfig(channels=(8, 16, 32), strides=(2, 2))
