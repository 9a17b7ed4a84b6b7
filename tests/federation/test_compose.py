"""Static checks of docker-compose.yml, the TLS override and the Dockerfile (no Docker engine here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from server.federation.launcher import FLOWER_ENV, superexec_command, superlink_command, supernode_command
from shared.synth import DEMO_SITES

ROOT = Path(__file__).resolve().parents[2]
SITES = [s.name for s in DEMO_SITES]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def tls_override() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "compose.tls.yml").read_text())


def test_services_one_supernode_and_clientapp_per_demo_site(compose):
    services = set(compose["services"])
    expected = {"superlink", "serverapp", "api"} | {f"supernode-{s}" for s in SITES} | {f"clientapp-{s}" for s in SITES}
    assert services == expected


def test_superlink_and_serverapp_match_the_native_launcher(compose):
    link = compose["services"]["superlink"]
    assert link["command"] == superlink_command("/app/state", host="0.0.0.0", port=9093, isolation="process")
    assert link["ports"] == ["9093:9093"]
    assert "superlink-state:/app/state" in link["volumes"] and "superlink-state" in compose["volumes"]
    serverapp = compose["services"]["serverapp"]
    assert serverapp["command"] == superexec_command("superlink:9093")
    assert "./runs:/app/runs" in serverapp["volumes"]


@pytest.mark.parametrize("site", SITES)
def test_each_site_has_its_own_data_volume_and_node_config(compose, site):
    node = compose["services"][f"supernode-{site}"]
    assert node["command"] == supernode_command("superlink:9093", 9094, site, f"/data/{site}", isolation="process",
                                                host="0.0.0.0")
    volume = f"./data/{site}:/data/{site}:ro"
    assert node["volumes"] == [volume]
    clientapp = compose["services"][f"clientapp-{site}"]
    assert clientapp["command"] == superexec_command(f"supernode-{site}:9094")
    assert clientapp["volumes"] == [volume]  # the ClientApp runs here and reads only its own site
    assert "superlink" in node["depends_on"] and f"supernode-{site}" in clientapp["depends_on"]
    assert not node.get("ports") and not clientapp.get("ports")  # runtime APIs stay inside the network


def test_no_two_sites_share_data(compose):
    mounts = [v for name, svc in compose["services"].items() if name.startswith("supernode-") for v in svc["volumes"]]
    assert len(mounts) == len(set(mounts)) == len(SITES)


def test_api_service_serves_the_registry_on_8080(compose):
    api = compose["services"]["api"]
    assert api["command"] == ["fedmri", "serve", "--host", "0.0.0.0", "--port", "8080"]
    assert api["ports"] == ["8080:8080"]
    assert "./runs:/app/runs:ro" in api["volumes"]
    assert api["environment"]["FEDMRI_REGISTRY_DIR"] == "/app/runs/registry"
    published = [p for svc in compose["services"].values() for p in svc.get("ports", [])]
    assert not any(p.split(":")[0] == "8000" for p in published)


def test_every_service_uses_the_project_image_without_runtime_installs(compose):
    for name, svc in compose["services"].items():
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile", name
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert {k: svc["environment"][k] for k in FLOWER_ENV} == FLOWER_ENV, name


def test_dockerfile_installs_cpu_torch_and_the_project():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in text
    assert text.index("torch==2.13.0") < text.index("RUN pip install .")
    for folder in ("shared", "server", "client"):
        assert f"COPY --chown=app:app {folder} ./{folder}" in text
    for key, value in FLOWER_ENV.items():
        assert f"{key}={value}" in text


@pytest.mark.parametrize("site", SITES)
def test_tls_override_adds_certificates_and_node_keys(tls_override, site):
    services = tls_override["services"]
    assert services["superlink"]["command"] == superlink_command(
        "/app/state", host="0.0.0.0", port=9093, tls_dir="/certs", supernode_auth=True, isolation="process")
    assert services["serverapp"]["command"] == superexec_command("superlink:9093", ca_cert="/certs/ca.crt")
    node = services[f"supernode-{site}"]
    assert node["command"] == supernode_command("superlink:9093", 9094, site, f"/data/{site}", ca_cert="/certs/ca.crt",
                                                auth_key=f"/keys/{site}", isolation="process", host="0.0.0.0")
    assert f"./deploy/keys/{site}:/keys/{site}:ro" in node["volumes"]
    assert not any("server.key" in v for v in node["volumes"])  # sites never see the SuperLink's key
