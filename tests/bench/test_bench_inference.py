"""bench/bench_inference.py on a tiny model and volume: every variant runs, the floor arithmetic holds."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from shared.data import DataConfig
from shared.model import ModelConfig

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture()
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_inference", BENCH / "bench_inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_inference"] = module
    spec.loader.exec_module(module)
    tiny = (ModelConfig(channels=(4, 8, 16), strides=(2, 2)), DataConfig(roi_size=(16, 16, 16), spacing=(4, 4, 4)))
    monkeypatch.setattr(module, "MODELS", {"large_1mm": tiny, "demo": tiny})
    g = torch.Generator().manual_seed(0)
    volume = torch.rand((1, 30, 36, 28), generator=g) * 400 + 100
    monkeypatch.setattr(module, "brain_volume", lambda spacing: volume)

    class SmallConv(module.DenseConv):
        def __init__(self, dtype=torch.float32):
            super().__init__(dtype)
            self.x = torch.randn(1, 32, 16, 16, 16)
            from torch.utils.flop_counter import FlopCounterMode

            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                self.conv(self.x)
            self.flops = counter.get_total_flops()

    monkeypatch.setattr(module, "DenseConv", SmallConv)
    return module


@pytest.mark.slow
def test_quick_run_writes_every_figure(bench, tmp_path):
    result = bench.run(quick=True, out_dir=tmp_path)
    saved = json.loads((tmp_path / "inference.json").read_text())
    assert saved["models"][0]["model"] == "large_1mm" and (tmp_path / "inference.md").exists()
    for m in result["models"]:
        assert {"monai", "fp32", "fp32_channels_last"} <= set(m["variants"])
        fp32 = m["variants"]["fp32"]
        assert fp32["label_agreement_with_monai"] == 1.0  # the float32 path is MONAI's result
        floor = fp32["flops"] / 1e9 / result["dense_conv_gflops"]
        assert fp32["floor_seconds"] == pytest.approx(floor, rel=0.02, abs=1e-4)
        assert m["forward_over_floor"] == m["variants"][m["best_same_prediction"]]["forward_over_floor"]
        assert 0 <= m["overlap_share"] < 1
    assert min(result["invariance_label_agreement"]["fp32"]) == 1.0
    assert result["load_average_before"] and result["load_average_after"]
