"""Run-config parsing and the errors a user sees before any process starts."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from server.federation import FederationError, run_federation
from server.federation.launcher import check_reachable, free_port
from shared.runconfig import RunConfig, run_config_defaults

ROOT = Path(__file__).resolve().parents[3]


def test_pyproject_declares_every_run_config_key_with_the_app_defaults():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    assert flwr["config"] == run_config_defaults()
    assert all(key == key.lower() and "_" not in key for key in flwr["config"])


def test_defaults_parse_and_round_trip():
    cfg = RunConfig.from_run_config({})
    assert cfg.strategy == "fedavg" and cfg.norm == "instance" and not cfg.fedbn
    assert cfg.network_config().channels == (8, 16, 32, 64)
    assert cfg.data_config().roi_size == (64, 64, 64)
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg


def test_default_run_deadline_follows_the_rounds_and_the_round_timeout():
    from server.federation.run import START_UP_S, run_timeout

    cfg = RunConfig.from_run_config({"num-server-rounds": 48, "round-timeout": 120.0})
    assert run_timeout(cfg) == 48 * 2 * 120.0 + START_UP_S  # a round's train and evaluate wait at most that
    assert run_timeout(RunConfig.from_run_config({"num-server-rounds": 96, "round-timeout": 120.0})) > run_timeout(cfg)
    # the old fixed hour ended a healthy 48-round run (~97 s rounds) at round 37
    assert run_timeout(RunConfig.from_run_config({"num-server-rounds": 48})) > 48 * 100


def test_values_parse_to_typed_fields():
    cfg = RunConfig.from_run_config(
        {
            "channels": "8,16,32",
            "spacing": "4,4,4",
            "roi-size": "32,32,32",
            "fedbn": "true",
            "sites": "a, b",
            "strategy": "FedProx",
        }
    )
    assert cfg.channels == (8, 16, 32) and cfg.network_config().strides == (2, 2)
    assert cfg.spacing == (4.0, 4.0, 4.0) and cfg.fedbn is True
    assert cfg.sites == ("a", "b") and cfg.strategy == "fedprox"
    bigger = RunConfig.from_run_config({"res-units": "2", "input-norm": "true", "channels": "16,32,64,128"})
    net = bigger.network_config()
    assert net.num_res_units == 2 and net.input_norm is True and net.channels == (16, 32, 64, 128)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"strategy": "fedsgd"}, "'strategy'"),
        ({"norm": "layer"}, "'norm'"),
        ({"num-server-rounds": 0}, "'num-server-rounds'"),
        ({"local-epochs": 1.5}, "'local-epochs'"),
        ({"lr": -1}, "'lr'"),
        ({"lr": "fast"}, "'lr'"),
        ({"fedbn": "maybe"}, "'fedbn'"),
        ({"channels": "8,x"}, "'channels'"),
        ({"roi-size": "4,4,4"}, "roi_size"),
        ({"data-dir": "relative/path"}, "'data-dir'.*absolute"),
        ({"min-sites": 3, "sites": "a,b"}, "'min-sites'"),
        ({"fault-inject": "site-a:explode"}, "'fault-inject'"),
        ({"run-name": "../escape"}, "'run-name'"),
        ({"num-rounds": 3}, "unknown run config key"),
        ({"res-units": 2}, "'res-units'.*'input-norm'"),
        ({"res-units": -1}, "'res-units'"),
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_run_config(override)


def test_run_federation_rejects_a_bad_config_before_starting_processes(tiny_data_dir, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="'strategy'"):
        run_federation(tiny_data_dir, tmp_path, run_config={"strategy": "fedsgd"})
    with pytest.raises(ValueError, match="min-sites"):
        run_federation(tiny_data_dir, tmp_path, sites=["site-a"], run_config={"min-sites": 2})
    with pytest.raises(ValueError, match="mode"):
        run_federation(tiny_data_dir, tmp_path, mode="docker")
    assert time.perf_counter() - start < 5  # nothing was launched
    assert not (tmp_path / "registry").exists()


def test_cli_reports_a_bad_config_value(tiny_data_dir, tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "federate",
            "--data",
            str(tiny_data_dir),
            "--out",
            str(tmp_path),
            "--set",
            "proximal-mu=-1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert res.returncode == 2
    assert "'proximal-mu'" in res.stderr and "Traceback" not in res.stderr


def test_unreachable_superlink_is_a_clear_error(tiny_data_dir, tmp_path):
    port = free_port()  # nothing listens there
    address = f"127.0.0.1:{port}"
    with pytest.raises(FederationError, match=f"SuperLink at {address} is not reachable"):
        check_reachable(address, timeout=2)
    start = time.perf_counter()
    with pytest.raises(FederationError, match="not reachable"):
        run_federation(tiny_data_dir, tmp_path, mode="native", superlink=address, sites=["site-a", "site-b"])
    assert time.perf_counter() - start < 15


def test_free_port_is_loopback_and_not_a_default():
    port = free_port()
    assert port not in (8000, 8080, 9091, 9092, 9093)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # really free


def test_cli_progress_prints_each_site_and_what_went_wrong(capsys):
    from server.commands.federate import print_record

    print_record(
        {
            "event": "round",
            "round": 2,
            "seconds": 3.5,
            "updated": True,
            "missing": ["site-c"],
            "sites": {
                "site-a": {
                    "train": {"train_loss": 0.8123},
                    "eval": {"dice_1": 0.5, "dice_2": 0.6, "dice_3": None, "dice_mean": 0.55},
                }
            },
            "failed": [],
            "rejected": [{"site": "site-b", "phase": "train", "reason": "w: contains NaN or Inf"}],
            "no_reply": [{"site": "site-c", "phase": "train"}],
        }
    )
    out = capsys.readouterr().out
    assert "round 2 (3.5s)" in out
    assert "site-a" in out and "loss 0.812" in out and "mean 0.550" in out and "lesion   -  " in out
    assert "site-b update rejected (train): w: contains NaN or Inf" in out
    assert "site-c no reply (train)" in out and "missing this round: site-c" in out


def test_the_fab_holds_only_the_apps_code_and_builds_without_the_rest_of_the_checkout(tmp_path):
    """Sites unpack the FAB for every message; the compose image has no bench/, tests/ or .gitignore."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    flwr = Path(sys.executable).with_name("flwr")
    for name, src in (("checkout", root), ("image", tmp_path / "image")):
        if name == "image":
            src.mkdir()
            shutil.copy(root / "pyproject.toml", src)
            for pkg in ("server", "client", "shared"):
                shutil.copytree(root / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        out = tmp_path / f"fab-{name}"
        out.mkdir()
        res = subprocess.run([str(flwr), "build", "--app", str(src)], cwd=out, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        (fab,) = out.glob("*.fab")
        names = zipfile.ZipFile(fab).namelist()
        assert "client/app.py" in names and "server/app.py" in names and "shared/model.py" in names
        assert not [n for n in names if n.split("/")[0] in ("bench", "tests", "deploy") or n.endswith(".md")]
