"""`fedmri ood`: a registered model gets its OOD reference from the site folders."""

from __future__ import annotations

from server.cli import main
from shared.data import DataConfig
from shared.model import ModelConfig, build_unet
from shared.ood import THRESHOLD, read_ood
from shared.registry import mark_served, save_model


def test_ood_command_writes_the_served_models_reference(tiny_data_dir, tmp_path, capsys):
    mcfg, dcfg = ModelConfig(channels=(8, 16, 32), strides=(2, 2)), DataConfig(spacing=(4, 4, 4), roi_size=(32, 32, 32))
    save_model(tmp_path, "v1", build_unet(mcfg).state_dict(), mcfg, dcfg)
    mark_served(tmp_path, "v1")
    assert main(["ood", "--data", str(tiny_data_dir), "--registry", str(tmp_path), "--sites", "site-a,site-b"]) == 0
    record = read_ood(tmp_path, "v1")
    assert set(record["sites"]) == {"site-a", "site-b"} and record["threshold"] == THRESHOLD
    assert [s["n"] for s in record["sites"].values()] == [3, 3]
    assert "threshold 2" in capsys.readouterr().out
    assert main(["ood", "--data", str(tmp_path / "nowhere"), "--registry", str(tmp_path / "empty")]) == 2
