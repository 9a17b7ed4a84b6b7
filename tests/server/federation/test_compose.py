"""Static checks of docker-compose.yml, the TLS override, the Dockerfile and scripts/compose-test.sh.

The compose stack itself runs for real in ``scripts/compose-test.sh`` (it needs a Docker engine and root);
these checks tie the files to the native launcher and the CLI, which are tested with real processes.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from server.cli import build_parser
from server.federation.launcher import (
    FLOWER_ENV,
    SUPERNODE_ENV,
    superexec_command,
    superlink_command,
    supernode_command,
)
from shared.synth import DEMO_SITES

ROOT = Path(__file__).resolve().parents[3]
SITES = [s.name for s in DEMO_SITES]
# Each site's torch threads: all its container sees unless FEDMRI_SITE_CPUS gives it a share (bench/bench_compose.py)
SITE_CPUS = "${FEDMRI_SITE_CPUS:-0}"
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
FLOWER_SERVICES = {"superlink", "serverapp"} | {f"{k}-{s}" for s in SITES for k in ("supernode", "clientapp")}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_TEXT)


@pytest.fixture(scope="module")
def tls_override() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "compose.tls.yml").read_text())


def default_of(variable: str) -> str:
    """The default a ``${VAR:-default}`` in docker-compose.yml gives ``variable``."""
    m = re.search(r"\$\{" + variable + r":-([^}]*)\}", COMPOSE_TEXT)
    assert m, f"{variable} has no default in docker-compose.yml"
    return m.group(1)


def shell_command(svc: dict) -> str:
    """The ``sh -c`` script of a one-shot service, with compose's ``$$`` escapes undone."""
    assert svc["command"][:2] == ["sh", "-c"]
    return svc["command"][2].replace("$$", "$")


def parse_cli(script: str, env: dict[str, str]):
    """Parse a one-shot service's ``exec fedmri ...`` with the real CLI parser (flags exist, values parse)."""
    words = shlex.split(re.sub(r'"?\$(\w+)"?', lambda m: env[m.group(1)], script))
    assert words[:2] == ["exec", "fedmri"], script
    return build_parser().parse_args(words[2:])


def depends(svc: dict) -> dict[str, str]:
    deps = svc.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: d["condition"] for name, d in deps.items()}


def test_services_one_supernode_and_clientapp_per_demo_site(compose):
    assert set(compose["services"]) == FLOWER_SERVICES | {"data", "federate", "report", "api"}


def test_superlink_and_serverapp_match_the_native_launcher(compose):
    link = compose["services"]["superlink"]
    assert link["command"] == superlink_command(host="0.0.0.0", port=9093, isolation="process")
    assert not link.get("ports") and not link.get("volumes")  # the submitter runs inside the network
    assert "9093" in " ".join(link["healthcheck"]["test"])
    serverapp = compose["services"]["serverapp"]
    assert serverapp["command"] == superexec_command("superlink:9093")
    assert serverapp["volumes"] == ["runs:/runs"]
    assert depends(serverapp) == {"superlink": "service_healthy"}


@pytest.mark.parametrize("site", SITES)
def test_each_site_has_its_own_data_volume_and_node_config(compose, site):
    node = compose["services"][f"supernode-{site}"]
    assert node["command"] == supernode_command(
        "superlink:9093",
        9094,
        site,
        f"/data/{site}",
        isolation="process",
        host="0.0.0.0",
        cache_dir="/cache",
        cpus=SITE_CPUS,
    )
    volume = f"{site}-data:/data/{site}:ro"
    assert node["volumes"] == [volume]
    clientapp = compose["services"][f"clientapp-{site}"]
    assert clientapp["command"] == superexec_command(f"supernode-{site}:9094", runner="fedmri")
    assert clientapp["volumes"] == [volume]  # the ClientApp runs here and reads only its own site
    # ... and keeps its site cache in a writable tmpfs (its warm worker in the container's /tmp); SuperExec polls as
    # the native launcher makes it poll
    assert "/cache:mode=1777" in clientapp["tmpfs"]
    assert {k: clientapp["environment"][k] for k in SUPERNODE_ENV} == SUPERNODE_ENV
    assert depends(node) == {"superlink": "service_healthy", "data": "service_completed_successfully"}
    assert f"supernode-{site}" in depends(clientapp)
    assert not node.get("ports") and not clientapp.get("ports")  # runtime APIs stay inside the network


def test_no_two_sites_share_data(compose):
    mounts = [v for name, svc in compose["services"].items() if name.startswith("supernode-") for v in svc["volumes"]]
    assert len(mounts) == len(set(mounts)) == len(SITES)


def test_data_step_generates_every_site_into_its_volume_without_a_network(compose):
    data = compose["services"]["data"]
    assert data["volumes"] == [f"{site}-data:/data/{site}" for site in SITES]
    assert all(f"{site}-data" in compose["volumes"] for site in SITES)
    args = parse_cli(shell_command(data), {"FEDMRI_GENERATE_ARGS": default_of("FEDMRI_GENERATE_ARGS")})
    assert args.command == "generate" and args.out == "/data"
    assert data["network_mode"] == "none" and data["restart"] == "no"


def test_federate_submits_to_the_compose_superlink_with_the_demo_settings(compose):
    federate = compose["services"]["federate"]
    env = {"FEDMRI_SITES": default_of("FEDMRI_SITES"), "FEDMRI_FEDERATE_ARGS": default_of("FEDMRI_FEDERATE_ARGS")}
    args = parse_cli(shell_command(federate), env)
    assert (args.command, args.mode, args.superlink, args.out) == ("federate", "native", "superlink:9093", "/runs")
    assert args.sites == SITES
    # scripts/demo.sh's recipe, flag for flag: only where it runs and what it is called differ
    demo = re.search(r"^fedmri federate .*?(?<!\\)\n", (ROOT / "scripts" / "demo.sh").read_text(), re.M | re.S)
    script = re.sub(r"#[^\n]*", "", demo.group(0)).replace("\\\n", " ")
    demo_args = parse_cli("exec " + script, {"data": "data", "runs": "runs", "run": "demo"})
    where = {"mode", "superlink", "data", "out", "run_name", "sites"}
    recipe = {k: v for k, v in vars(args).items() if k not in where}
    assert recipe == {k: v for k, v in vars(demo_args).items() if k not in where}
    assert recipe["max_steps"] == 44 and recipe["lesion_paste_prob"] == 1.0  # the parse saw the whole command
    assert federate["volumes"] == ["runs:/runs"]  # where the ServerApp writes: the submitter follows its run log
    assert depends(federate) == {
        "superlink": "service_healthy",
        "serverapp": "service_started",
        "data": "service_completed_successfully",
    }
    assert federate["networks"] == ["federation"] and federate["restart"] == "no"


def test_report_reads_the_registry_and_every_site_and_writes_the_reports_volume(compose):
    report = compose["services"]["report"]
    env = {"FEDMRI_SITES": default_of("FEDMRI_SITES"), "FEDMRI_REPORT_ARGS": default_of("FEDMRI_REPORT_ARGS")}
    args = parse_cli(shell_command(report), env)
    assert (args.command, args.data, args.registry, args.out) == ("report", "/data", "/runs/registry", "/reports")
    assert report["volumes"] == ["runs:/runs:ro", "reports:/reports"] + [f"{s}-data:/data/{s}:ro" for s in SITES]
    assert depends(report) == {"federate": "service_completed_successfully"}
    assert report["network_mode"] == "none"


def test_api_requires_its_key_and_serves_the_registry_and_reports_on_loopback(compose):
    from server.api.routes.health import router

    api = compose["services"]["api"]
    assert api["command"] == ["fedmri", "serve", "--host", "0.0.0.0", "--port", "8080"]
    assert api["environment"]["FEDMRI_API_KEY"].startswith("${FEDMRI_API_KEY:?")  # `up` refuses to start without
    assert api["environment"]["FEDMRI_REGISTRY_DIR"] == "/runs/registry"
    assert api["environment"]["FEDMRI_REPORTS_DIR"] == "/reports"
    assert api["volumes"] == ["runs:/runs:ro", "reports:/reports"]  # reads the registry, writes reports; no site data
    assert api["ports"] == ["127.0.0.1:${FEDMRI_API_PORT:-8080}:8080"]
    probe = " ".join(api["healthcheck"]["test"])
    paths = {route.path for route in router.routes}
    assert {"/healthz", "/readyz"} <= paths and "/healthz" in probe and "/readyz" in probe
    assert depends(api) == {"report": "service_completed_successfully"}
    assert api["networks"] == ["front"]


def test_only_the_api_is_published_and_flower_traffic_stays_on_an_internal_network(compose):
    published = {name: svc["ports"] for name, svc in compose["services"].items() if svc.get("ports")}
    assert list(published) == ["api"]
    assert compose["networks"]["federation"]["internal"] is True
    for name in FLOWER_SERVICES:
        assert compose["services"][name]["networks"] == ["federation"], name


def test_every_service_uses_the_project_image_without_runtime_installs(compose):
    for name, svc in compose["services"].items():
        assert svc["image"] == "${FEDMRI_IMAGE:-fedmri:latest}", name
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile", name
        assert svc["build"]["args"]["BASE_IMAGE"] == "${FEDMRI_BASE_IMAGE:-python:3.11-slim}", name
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert {k: svc["environment"][k] for k in FLOWER_ENV} == FLOWER_ENV, name
        restart = "no" if name in {"data", "federate", "report"} else "unless-stopped"
        assert svc["restart"] == restart, name


def test_dockerfile_public_defaults_cpu_torch_first_and_the_project_editable():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert text.index("ARG BASE_IMAGE=python:3.11-slim") < text.index("FROM ${BASE_IMAGE}")
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "$TORCH_INDEX_URL" torch==2.13.0' in text
    assert (
        text.index("torch==2.13.0")
        < text.index("pip install -r /tmp/requirements.txt")
        < text.index("pip install --no-deps --no-build-isolation -e .")
    )
    for folder in ("shared", "server", "client"):
        assert f"COPY --chown=app:app {folder} ./{folder}" in text
    for key, value in FLOWER_ENV.items():
        assert f"{key}={value}" in text
    for site in SITES:  # new named volumes take the mount point's owner: the app user can write the demo data
        assert f"/data/{site}" in text


def test_build_context_leaves_out_the_venv_data_and_runs():
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "README.md", "shared", "server", "client", "deploy/local"} <= allowed
    assert not allowed & {".venv", "data", "runs", ".git"}
    assert (ROOT / "deploy" / "local" / ".gitignore").is_file()  # COPY deploy/local/ needs the folder


@pytest.mark.parametrize("site", SITES)
def test_tls_override_adds_certificates_and_node_keys(tls_override, site):
    services = tls_override["services"]
    assert services["superlink"]["command"] == superlink_command(
        host="0.0.0.0", port=9093, tls_dir="/certs", supernode_auth=True, isolation="process"
    )
    assert services["serverapp"]["command"] == superexec_command("superlink:9093", ca_cert="/certs/ca.crt")
    node = services[f"supernode-{site}"]
    assert node["command"] == supernode_command(
        "superlink:9093",
        9094,
        site,
        f"/data/{site}",
        ca_cert="/certs/ca.crt",
        auth_key=f"/keys/{site}",
        isolation="process",
        host="0.0.0.0",
        cache_dir="/cache",
        cpus=SITE_CPUS,
    )
    assert f"${{FEDMRI_KEYS_DIR:-./deploy/keys}}/{site}:/keys/{site}:ro" in node["volumes"]
    assert not any("server.key" in v for v in node["volumes"])  # sites never see the SuperLink's key
    assert depends(node)["register"] == "service_completed_successfully"  # keys registered before nodes connect


def test_tls_register_step_sees_public_keys_only_and_federate_verifies_the_superlink(tls_override):
    services = tls_override["services"]
    keys = [v for v in services["register"]["volumes"] if "/keys/" in v]
    assert keys == [f"${{FEDMRI_KEYS_DIR:-./deploy/keys}}/{s}.pub:/keys/{s}.pub:ro" for s in SITES]
    assert "flwr supernode register" in services["register"]["command"][2]
    script = shell_command(services["federate"])
    args = parse_cli(script, {"FEDMRI_SITES": "hospital-a", "FEDMRI_FEDERATE_ARGS": ""})
    assert (args.superlink, args.tls_dir) == ("superlink:9093", "/certs")


def test_compose_test_script_is_valid_bash():
    script = ROOT / "scripts" / "compose-test.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)
