"""deploy/ scripts for real: certificates and node keys that a TLS SuperLink with SuperNode auth accepts."""

from __future__ import annotations

import subprocess
import time

import pytest

from server.federation.launcher import LocalFederation, flower_env, free_port, supernode_command

pytestmark = pytest.mark.slow


def test_scripts_make_a_verifiable_certificate_and_p384_keys(credentials):
    certs, keys = credentials
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", certs / "ca.crt", certs / "server.pem"], capture_output=True, text=True
    )
    assert verify.returncode == 0
    san = subprocess.run(
        ["openssl", "x509", "-in", certs / "server.pem", "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
    ).stdout
    assert "DNS:superlink" in san and "IP Address:127.0.0.1" in san
    assert (keys / "site-a.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert "OPENSSH PRIVATE KEY" in (keys / "site-a").read_text()
    assert (keys / "site-a").stat().st_mode & 0o077 == 0  # private key not readable by others


def test_tls_superlink_admits_registered_supernodes_only(credentials, tiny_data_dir, tmp_path):
    certs, keys = credentials
    federation = LocalFederation(
        tmp_path / "fed", sites={"site-a": tiny_data_dir / "site-a"}, tls_dir=certs, auth_keys_dir=keys
    )
    intruder = None
    try:
        federation.start()
        deadline = time.monotonic() + 60
        nodes = []
        while time.monotonic() < deadline:
            nodes = federation.connected_nodes()  # over TLS, verified against ca.crt
            if [n["status"] for n in nodes] == ["online"]:
                break
            time.sleep(1)
        assert [n["status"] for n in nodes] == ["online"]
        # A SuperNode whose key was never registered is refused.
        cmd = supernode_command(
            federation.address,
            free_port(),
            "intruder",
            str(tiny_data_dir / "site-b"),
            ca_cert=str(certs / "ca.crt"),
            auth_key=str(keys / "intruder"),
        )
        log = tmp_path / "intruder.log"
        with log.open("w") as sink:
            intruder = subprocess.Popen(
                cmd, env=federation.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
            intruder.wait(timeout=60)
        out = log.read_text()
        assert "Exit Code: 305" in out and "Failed to activate SuperNode" in out  # refused by the SuperLink
        assert [n["status"] for n in federation.connected_nodes()] == ["online"]
    finally:
        if intruder is not None and intruder.poll() is None:
            intruder.kill()
            intruder.wait()
        federation.close()
    assert federation.leftover_pids() == set()
    assert flower_env(tmp_path)["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
