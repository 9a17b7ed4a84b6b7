"""`fedmri serve` refuses a non-loopback address without an API key unless told --insecure (real processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from server.commands.serve import is_loopback


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FEDMRI_API_KEY", "FEDMRI_ADMIN_KEY")}
    return {**env, **extra}


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("[::1]", True),
                                            ("localhost", True), ("0.0.0.0", False), ("::", False),
                                            ("10.0.0.5", False), ("api.hospital.example", False)])
def test_loopback_detection(host, loopback):
    assert is_loopback(host) is loopback


def test_public_host_without_key_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--host", "0.0.0.0", "--port", str(_port()),
                           "--registry", str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in proc.stderr
    assert "FEDMRI_API_KEY" in proc.stderr and "--insecure" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["key", "insecure"])
def test_public_host_starts_with_a_key_or_insecure(tmp_path, how):
    port = _port()
    args = [sys.executable, "-m", "server.cli", "serve", "--host", "0.0.0.0", "--port", str(port),
            "--registry", str(tmp_path)]
    env = _env(FEDMRI_API_KEY="k") if how == "key" else _env()
    if how == "insecure":
        args.append("--insecure")
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        if how == "insecure":
            assert "WITHOUT an API key (--insecure)" in log.read_text()
        else:
            assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
