"""Fixtures shared by every test: tiny real sites (4 mm MNI152 subjects) and tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from shared.data import DataConfig
from shared.model import ModelConfig
from shared.scanner import ScannerProfile
from shared.synth import SiteSpec, generate_sites

TINY_SPACING = (4.0, 4.0, 4.0)

# Three scanners as different as the demo's; 4 mm volumes (50x59x48) keep tests fast on 2 cores.
TINY_SITES = (
    SiteSpec("site-a", ScannerProfile(scale=1.0, shift=0.0, spacing=TINY_SPACING), n_train=3, n_test=1),
    SiteSpec("site-b", ScannerProfile(scale=4.0, shift=-300.0, spacing=TINY_SPACING), n_train=3, n_test=1),
    SiteSpec(
        "site-c",
        ScannerProfile(scale=0.25, shift=500.0, gamma=0.7, bias_strength=0.2, noise_std=0.01, spacing=TINY_SPACING),
        n_train=2,
        n_test=1,
    ),
)


@pytest.fixture
def task_identity():
    """What Flower's ClientApp runtime sets in its process before it calls the app."""
    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A data folder with three real NIfTI sites in the Decathlon layout (made once per session)."""
    root = tmp_path_factory.mktemp("data")
    generate_sites(root, TINY_SITES, seed=0, resolution=4, lesion_probability=0.7)
    return root


def tiny_configs(norm: str = "instance") -> tuple[ModelConfig, DataConfig]:
    """A 3-level UNet and 32^3 crops at 4 mm: trains in seconds on 2 cores."""
    return (
        ModelConfig(norm=norm, channels=(8, 16, 32), strides=(2, 2)),
        DataConfig(spacing=TINY_SPACING, roi_size=(32, 32, 32), batch_size=2, samples_per_volume=2, val_fraction=0.34),
    )


@pytest.fixture
def tiny_data_config() -> DataConfig:
    return tiny_configs()[1]


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    return tiny_configs()[0]


@pytest.fixture(scope="session")
def train_tiny(tiny_data_dir):
    """``train_tiny(norm, epochs, lr=3e-3)`` -> (model, history, sites, mcfg, dcfg).

    Trains a tiny model on the three tiny sites pooled from the weights ``torch.manual_seed(0);
    build_unet(mcfg)`` gives; sites include their test cases.
    """
    import torch

    from shared.model import build_unet
    from shared.training import discover_sites, load_site, train_on_sites

    def train(norm: str = "instance", epochs: int = 6, lr: float = 3e-3):
        mcfg, dcfg = tiny_configs(norm)
        torch.manual_seed(0)
        model = build_unet(mcfg)
        sites = [load_site(p, dcfg, with_test=True) for p in discover_sites(tiny_data_dir)]
        history = train_on_sites(sites, model, dcfg, epochs, lr=lr, seed=0)
        return model, history, sites, mcfg, dcfg

    return train
