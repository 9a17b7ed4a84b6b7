"""A site's local layers on its own disk (shared.site_state)."""

from __future__ import annotations

import torch

from shared.site_state import STATE_DIR_NAME, load_local_state, local_state_path, save_local_state


def test_local_state_round_trip_under_the_site_folder(tmp_path):
    site = tmp_path / "site-a"
    path = local_state_path(site, "run-1")
    assert path == site / STATE_DIR_NAME / "run-1.pt"
    assert load_local_state(path) is None
    state = {"model.1.adn.N.weight": torch.arange(4.0), "model.1.adn.N.bias": torch.zeros(4)}
    save_local_state(path, state, round_=3, run_name="run-1")
    round_, loaded = load_local_state(path)
    assert round_ == 3 and set(loaded) == set(state) and torch.equal(loaded["model.1.adn.N.weight"], torch.arange(4.0))
    save_local_state(path, {k: v + 1 for k, v in state.items()}, round_=4)
    assert load_local_state(path)[0] == 4 and [p.name for p in path.parent.iterdir()] == ["run-1.pt"]  # no temp left


def test_node_config_state_dir_and_unreadable_files(tmp_path):
    assert local_state_path(tmp_path / "s", "", {"state-dir": str(tmp_path / "x")}) == tmp_path / "x" / "default.pt"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    assert load_local_state(bad) is None
