"""Credentials the federation tests share: made by the deploy/ scripts themselves, once per session."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def credentials(tmp_path_factory) -> tuple[Path, Path]:
    """(certs, keys): deploy/gen-certs.sh's CA and SuperLink certificate, deploy/gen-node-keys.sh's key pairs
    for site-a, site-b, site-c and an "intruder" whose key is never registered."""
    root = tmp_path_factory.mktemp("credentials")
    subprocess.run(["bash", str(ROOT / "deploy" / "gen-certs.sh"), str(root / "certs")], check=True,
                   capture_output=True)
    subprocess.run(["bash", str(ROOT / "deploy" / "gen-node-keys.sh"), str(root / "keys"), "site-a", "site-b",
                    "site-c", "intruder"], check=True, capture_output=True)
    return root / "certs", root / "keys"
