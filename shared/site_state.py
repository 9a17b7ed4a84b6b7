"""A site's local parameters (FedBN's normalisation layers) on that site's own disk.

Under FedBN each hospital keeps its normalisation layers (BatchNorm statistics and affine
parameters, or the per-channel gamma, beta of an affine instance norm): it trains and predicts
with its own, and they never enter the global model the sites start each round from. (The update
still carries them; the server averages them apart from the global model, only so that a
hospital outside the federation can be offered complete "new site" layers: the ablation's
FedBN *new site* row.) Flower keeps a site's own layers in the node's in-memory
``context.state``; this module also writes them after every round to the site's disk (the
file itself is never sent), so they survive a restarted SuperNode and a resumed run, and the
site can use its personalised model after the federation ends:

    <site data folder>/.fedmri-state/<run-name>.pt      (or node config ``state-dir``)

The file holds ``{"run": run name, "round": last round trained, "state": {key: tensor}}``;
writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["STATE_DIR_NAME", "local_state_path", "save_local_state", "load_local_state"]

STATE_DIR_NAME = ".fedmri-state"


def local_state_path(site_dir: str | Path, run_name: str, node_config: Mapping | None = None) -> Path:
    """Where this site keeps ``run_name``'s local layers: node config ``state-dir`` or ``<site>/.fedmri-state``."""
    root = str((node_config or {}).get("state-dir", "") or "") or str(Path(site_dir) / STATE_DIR_NAME)
    return Path(root) / f"{run_name or 'default'}.pt"


def save_local_state(path: str | Path, state: Mapping[str, torch.Tensor], round_: int, run_name: str = "") -> Path:
    """Write the local layers after round ``round_`` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"run": run_name, "round": int(round_), "state": {k: v.detach().cpu().clone() for k, v in state.items()}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_local_state(path: str | Path) -> tuple[int, dict[str, torch.Tensor]] | None:
    """``(round, state)`` saved at ``path``, or None when there is none (or it is unreadable)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return int(payload["round"]), dict(payload["state"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError):
        return None
