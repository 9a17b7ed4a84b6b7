"""The `fedmri` console script, run as a user runs it (a real subprocess)."""

import json
import subprocess
import sys

import pytest

from server.cli import COMMANDS, build_parser


def fedmri(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_every_subcommand_is_wired_and_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS), f"missing subcommands: {set(COMMANDS) - set(sub.choices)}"
    for name in sub.choices:
        help_text = sub.choices[name].format_help()
        assert name in help_text and "--" in help_text


def test_help_runs():
    result = fedmri("--help")
    assert result.returncode == 0 and "generate" in result.stdout and "train" in result.stdout


def test_train_writes_a_registered_model(tiny_data_dir, tmp_path):
    result = fedmri(
        "train",
        "--data",
        str(tiny_data_dir),
        "--out",
        str(tmp_path),
        "--epochs",
        "1",
        "--roi",
        "32,32,32",
        "--spacing",
        "4,4,4",
        "--channels",
        "8,16,32",
        "--serve",
    )
    assert result.returncode == 0, result.stderr
    assert "val site-a: Dice" in result.stdout
    meta = json.loads((tmp_path / "registry" / "pooled-instance" / "meta.json").read_text())
    assert meta["sites"] == ["site-a", "site-b", "site-c"] and meta["norm"] == "instance"
    assert set(meta["metrics"]) == {"site-a", "site-b", "site-c"}
    assert json.loads((tmp_path / "registry" / "served.json").read_text()) == {"version": "pooled-instance"}


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--data", "/nonexistent/fedmri-data"], "no site folders"),
        (["train", "--norm", "layer"], "invalid choice"),
        (["train", "--roi", "a,b,c"], "comma-separated integers"),
    ],
)
def test_bad_arguments_fail_clearly(args, message, tmp_path):
    result = fedmri(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
