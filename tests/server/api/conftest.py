"""Fixtures for the API tests: a trained tiny registry, app clients, NIfTI builders and a live server."""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from server.api.config import ApiSettings
from server.api.main import create_app
from shared.model import build_unet
from shared.registry import mark_served, save_model

TRAIN_EPOCHS = 25
REPO = Path(__file__).resolve().parents[3]
LIVE_UPLOAD_LIMIT = 2_000_000  # bytes; small so a real-HTTP 413 test stays cheap


@pytest.fixture(scope="session")
def api_registry(train_tiny, tmp_path_factory) -> Path:
    """A registry as the federation writes it: ``tiny`` (trained, served) and ``tiny-untrained``."""
    registry = tmp_path_factory.mktemp("api-registry")
    model, _, sites, mcfg, dcfg = train_tiny("instance", TRAIN_EPOCHS)
    torch.manual_seed(0)
    untrained = build_unet(mcfg)  # the weights the trained model started from
    save_model(registry, "tiny-untrained", untrained.state_dict(), mcfg, dcfg, kind="pooled", strategy="none",
               norm="instance")
    # Shaped like server/federation's meta.json: per site, train and eval metric dicts.
    metrics = {"site-a": {"node_id": 7, "eval": {"dice_mean": 0.61, "hd95_3": float("nan")},
                          "train": {"train_loss": 0.4}},
               "site-b": {"node_id": 9, "eval": {"dice_mean": 0.6}}}
    save_model(registry, "tiny", model.state_dict(), mcfg, dcfg, kind="federated", strategy="FedAvg", norm="instance",
               round=3, fedbn=False, run_name="tiny", sites=[s.name for s in sites],
               missing_sites=[], metrics=metrics)
    mark_served(registry, "tiny")
    return registry


@pytest.fixture
def upload_dir(tmp_path) -> Path:
    path = tmp_path / "uploads"
    path.mkdir()
    return path


@pytest.fixture
def make_client(api_registry, upload_dir) -> Iterator[Callable[..., TestClient]]:
    """``make_client(**settings)`` -> a started TestClient on the tiny registry (closed after the test)."""
    clients: list[TestClient] = []

    def make(**overrides) -> TestClient:
        # api_key=None unless a test sets one: the developer's environment must not change the results.
        settings = ApiSettings(**{"registry_dir": api_registry, "upload_dir": upload_dir, "api_key": None, **overrides})
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


@pytest.fixture(scope="session")
def site_case(tiny_data_dir) -> tuple[Path, Path]:
    """(image, label) of site-b's test subject (scanner 4x - 300)."""
    image = sorted((tiny_data_dir / "site-b" / "imagesTs").glob("*.nii.gz"))[0]
    return image, tiny_data_dir / "site-b" / "labelsTs" / image.name


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, *, version: int = 1, gz: bool = True,
                 qform_code: int = 1, sform_code: int = 1, dims: tuple[int, ...] | None = None) -> bytes:
    """Serialise a NIfTI-1/2 image to bytes (``.nii.gz`` when ``gz``).

    ``qform_code=0`` stores no qform (so a singular ``affine`` can go in the sform); ``dims``
    overwrites the header's shape after serialising, to make headers that lie about the data.
    """
    klass = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    img = klass(data, None)
    img.header.set_qform(affine if qform_code else None, code=qform_code)
    img.header.set_sform(affine, code=sform_code)
    img.header.set_xyzt_units("mm")
    raw = bytearray(img.to_bytes())
    if dims is not None:
        offset, dtype = (16, "<i8") if version == 2 else (40, "<i2")
        packed = np.array([len(dims), *dims, *[1] * (7 - len(dims))], dtype).tobytes()
        raw[offset : offset + 8 * np.dtype(dtype).itemsize] = packed
    return gzip.compress(bytes(raw), compresslevel=1) if gz else bytes(raw)


def _read_nifti(content: bytes) -> nib.Nifti1Image | nib.Nifti2Image:
    raw = gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content
    klass = nib.Nifti2Image if int.from_bytes(raw[:4], "little") == 540 else nib.Nifti1Image
    return klass.from_bytes(raw)


def _phantom(shape=(24, 20, 16), seed: int = 0) -> np.ndarray:
    """A smooth positive blob volume (float32)."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = np.exp(-sum(g**2 for g in grid) * 3)
    return (100 + 800 * blob + np.random.default_rng(seed).normal(0, 5, shape)).astype(np.float32)


@pytest.fixture(scope="session")
def nifti_bytes() -> Callable[..., bytes]:
    """``nifti_bytes(data, affine, version=1, gz=True, qform_code=1, sform_code=1, dims=None)``."""
    return _nifti_bytes


@pytest.fixture(scope="session")
def read_nifti() -> Callable[[bytes], nib.Nifti1Image]:
    """Parse a returned ``.nii``/``.nii.gz`` body."""
    return _read_nifti


@pytest.fixture(scope="session")
def phantom() -> Callable[..., np.ndarray]:
    """``phantom(shape=(24, 20, 16), seed=0)``: a smooth positive blob volume."""
    return _phantom


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(api_registry, tmp_path_factory) -> Iterator[dict]:
    """``fedmri serve`` in a real process on a free loopback port; yields url, upload dir and log path."""
    work = tmp_path_factory.mktemp("live")
    uploads, log_path = work / "uploads", work / "server.log"
    uploads.mkdir()
    port = free_port()
    env = {**os.environ, "FEDMRI_UPLOAD_DIR": str(uploads), "FEDMRI_MAX_CONCURRENT_INFERENCES": "2",
           "FEDMRI_TORCH_THREADS": "2", "FEDMRI_MAX_UPLOAD_BYTES": str(LIVE_UPLOAD_LIMIT)}
    env.pop("FEDMRI_API_KEY", None)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--registry", str(api_registry)],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"fedmri serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"fedmri serve not ready after 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield {"url": url, "uploads": uploads, "log": log_path, "process": proc, "upload_limit": LIVE_UPLOAD_LIMIT}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def chromium(tmp_path):
    """``chromium(flags)``: headless Debian Chromium under selenium with a fresh profile (skips when either is
    missing). Each test passes its own flags (WebGL tests need SwiftShader)."""

    def start(flags):
        webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
        from selenium.webdriver.chrome.service import Service

        binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
        if not binary or not driver:
            pytest.skip("Debian chromium/chromium-driver not installed (apt-get install -y chromium chromium-driver)")
        os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium: no usage statistics
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for flag in (*flags, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
            options.add_argument(flag)
        return webdriver.Chrome(service=Service(executable_path=driver), options=options)

    return start
