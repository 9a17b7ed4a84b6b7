"""Model registry: one folder per version with weights and metadata, and a pointer to the served one.

Layout::

    runs/registry/<version>/model.pt     state dict
    runs/registry/<version>/meta.json    model/data config, round, strategy, sites, metrics, time
    runs/registry/served.json            {"version": "<version>"} - what the API serves

Writes go through a temporary file and ``os.replace`` so a crash never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch

from shared.data import DataConfig
from shared.model import ModelConfig, build_unet

__all__ = [
    "save_model",
    "list_models",
    "load_model",
    "mark_served",
    "served_version",
    "read_meta",
    "data_config_from_meta",
    "last_checkpoint",
    "save_server_state",
    "load_server_state",
    "resume_point",
]

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _check_version(version: str) -> str:
    if not _VERSION_RE.match(version):
        raise ValueError(f"invalid model version {version!r}: use letters, digits, '.', '_' or '-'")
    return version


def save_model(
    registry: str | Path,
    version: str,
    state_dict: dict[str, torch.Tensor],
    model_config: ModelConfig,
    data_config: DataConfig,
    **meta,
) -> Path:
    """Store weights and metadata as ``registry/version``; extra keyword args go into meta.json."""
    folder = Path(registry) / _check_version(version)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    _atomic_write_bytes(folder / "model.pt", lambda p: torch.save(state, p))
    record = {
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_config": model_config.to_dict(),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(data_config).items()},
        **meta,
    }
    _atomic_write_bytes(folder / "meta.json", lambda p: p.write_text(json.dumps(record, indent=2, default=str) + "\n"))
    return folder


def read_meta(registry: str | Path, version: str) -> dict:
    path = Path(registry) / _check_version(version) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"model version {version!r} not found in {registry}")
    return json.loads(path.read_text())


def list_models(registry: str | Path) -> list[dict]:
    """Metadata of every complete version, oldest first."""
    root = Path(registry)
    metas = (
        [json.loads(p.read_text()) for p in root.glob("*/meta.json") if (p.parent / "model.pt").is_file()]
        if root.is_dir()
        else []
    )
    return sorted(metas, key=lambda m: (m.get("created", ""), m["version"]))


def mark_served(registry: str | Path, version: str) -> None:
    read_meta(registry, version)  # must exist
    path = Path(registry) / "served.json"
    _atomic_write_bytes(path, lambda p: p.write_text(json.dumps({"version": version}) + "\n"))


def served_version(registry: str | Path) -> str | None:
    """The served version, else the newest one, else None."""
    path = Path(registry) / "served.json"
    if path.is_file():
        return json.loads(path.read_text())["version"]
    models = list_models(registry)
    return models[-1]["version"] if models else None


def load_model(registry: str | Path, version: str | None = None, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the network of ``version`` (default: the served one) in eval mode, with its metadata."""
    version = version or served_version(registry)
    if version is None:
        raise FileNotFoundError(f"no model registered in {registry}")
    meta = read_meta(registry, version)
    model = build_unet(ModelConfig(**meta["model_config"]))
    state = torch.load(Path(registry) / version / "model.pt", map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def data_config_from_meta(meta: dict) -> DataConfig:
    return DataConfig(**meta["data_config"])


def last_checkpoint(registry: str | Path, run_name: str) -> tuple[int, str] | None:
    """(round, version) of the newest complete ``<run-name>-r<round>`` checkpoint, if any."""
    pattern = re.compile(rf"^{re.escape(run_name)}-r(\d+)$")
    found = [
        (int(m.group(1)), p.name)
        for p in Path(registry).glob(f"{run_name}-r*")
        if (m := pattern.match(p.name)) and (p / "model.pt").is_file() and (p / "meta.json").is_file()
    ]
    return max(found) if found else None


def resume_point(registry: str | Path, run_name: str, resume: bool) -> tuple[int, str] | None:
    """Where run ``run_name`` continues from: its last checkpoint if ``resume``, else None.

    Raises:
        ValueError: the run already has checkpoints but ``resume`` is off (a name is used once).
    """
    previous = last_checkpoint(registry, run_name)
    if previous and not resume:
        raise ValueError(
            f"run {run_name!r} already has checkpoints up to round {previous[0]} in {registry}; "
            "resume it (run config resume=true, fedmri federate --resume) or choose another run name"
        )
    return previous


SERVER_STATE = "server_state.pt"


def save_server_state(registry: str | Path, version: str, arrays: dict) -> None:
    """The server optimiser's state (FedAdam's moments) beside a checkpoint, so a resume continues it."""
    state = {k: torch.as_tensor(v) for k, v in arrays.items()}
    _atomic_write_bytes(Path(registry) / _check_version(version) / SERVER_STATE, lambda p: torch.save(state, p))


def load_server_state(registry: str | Path, version: str) -> dict:
    """What ``save_server_state`` stored for ``version`` as numpy arrays; empty if nothing was stored."""
    path = Path(registry) / _check_version(version) / SERVER_STATE
    if not path.is_file():
        return {}
    return {k: v.numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
