"""bench/bench_budget.py: demo.sh's recipe with more rounds, a reused run checked against it, the table."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def budget():  # importing it puts bench/ on sys.path (bench_federation below)
    spec = importlib.util.spec_from_file_location("bench_budget", BENCH / "bench_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe(command):
    from server.cli import build_parser
    from server.commands.options import run_config_from_args

    return run_config_from_args(build_parser().parse_args(command[1:]))


def test_command_is_demo_recipe_with_more_rounds_and_the_extra_flags(budget, tmp_path):
    from bench_federation import demo_recipe

    command = budget.federate_command(tmp_path / "d", tmp_path / "r", "big", 30, "--res-units 2 --input-norm")
    assert command[1] == "federate" and command.count("--rounds") == 1 and command.count("--data") == 1
    got, demo = recipe(command), demo_recipe()
    assert got["num-server-rounds"] == 30 and demo["num-server-rounds"] != 30
    assert got["res-units"] == 2 and got["input-norm"] is True
    assert {k: v for k, v in got.items() if k in demo and k != "num-server-rounds"} == {
        k: v for k, v in demo.items() if k != "num-server-rounds"}


def test_reuse_refuses_a_run_of_another_recipe(budget, tmp_path):
    command = budget.federate_command(tmp_path, tmp_path, "big", 30, budget.EXTRA)
    recorded = {k: budget._normal(v) for k, v in recipe(command).items()}  # the registry keeps "48,48,48"
    budget.check_recipe({"run_name": "big", "config": recorded}, command)
    with pytest.raises(SystemExit, match="lr"):
        budget.check_recipe({"run_name": "big", "config": {**recorded, "lr": "0.01"}}, command)


def test_table_says_which_round_meets_the_goals(budget):
    def row(rnd, tissue_d, lesion, flagged):
        sites = {f"hospital-{s}": {"tissue": t} for s, t in zip("ad", (0.95, tissue_d))}
        scores = {"sites": sites, "lesion_dice": lesion, "lesion_cases": 8, "flagged": flagged}
        return {"round": rnd, "federation_s": 60.0 * rnd, "scores": scores, "met": budget.met(scores)}

    result = {"date": "d", "cpus": 2, "load_before": [0], "load_after": [0], "command": "fedmri federate",
              "federate_seconds": 600.0, "rounds": 10, "median_round_s": 60.0, "selected_round": 10,
              "rows": [row(5, 0.89, 0.6, []), row(10, 0.91, 0.55, [])]}
    text = budget.render(result)
    assert result["rows"][0]["met"] == {"tissue": False, "lesion": True, "unflagged": True}
    assert "missed: tissue" in text and "10 (selected)" in text
    assert "First scored round meeting all: **10**" in text
