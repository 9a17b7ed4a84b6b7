"""The fast sliding-window predictor (shared.inferer): same result as MONAI's, invariance kept."""

import warnings

import pytest
import torch

from shared.inferer import (
    InferenceOptions,
    SlidingWindowPredictor,
    bf16_supported,
    covering_window,
    network_flops,
    resolve_device,
    window_plan,
)
from shared.model import build_unet
from shared.synth import synthesize_subject
from shared.training import predict_logits

ROI = (16, 16, 16)
AFFINES = [(0.25, -500.0), (4.0, 300.0), (5.0, -1000.0)]


def tiny_net(**kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_unet(channels=(4, 8, 16), strides=(2, 2), **kwargs).eval()


@pytest.fixture(scope="module")
def volume():
    return torch.from_numpy(synthesize_subject(4, resolution=4).signal)[None]  # (1, X, Y, Z) at 4 mm


def test_fp32_path_equals_monai_sliding_window(volume):
    net = tiny_net()
    reference = predict_logits(net, volume, ROI)
    fast = SlidingWindowPredictor(net, ROI).logits(volume)
    assert fast.shape == reference.shape
    assert torch.allclose(fast, reference, atol=1e-5, rtol=0)


def test_channels_last_gives_the_same_labels(volume):
    net = tiny_net()
    reference = SlidingWindowPredictor(tiny_net(), ROI).logits(volume)
    fast = SlidingWindowPredictor(net, ROI, InferenceOptions(channels_last=True)).logits(volume)
    assert torch.allclose(fast, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fast_path_is_invariant_to_scanner_affine(volume, precision):
    # The invariance the product rests on, through the fast path: bf16 keeps the first conv in
    # float32, so raw intensities of hundreds never lose digits before the first instance norm.
    predictor = SlidingWindowPredictor(tiny_net(), ROI, InferenceOptions(precision=precision))
    base = predictor.labels(volume)
    agreement = [float((predictor.labels(s * volume + b) == base).float().mean()) for s, b in AFFINES]
    # Measured: fp32 1.0000; bf16 on this untrained net (logits near ties) >= 0.999.
    assert min(agreement) >= (0.9999 if precision == "fp32" else 0.995), agreement


def test_bf16_labels_agree_with_fp32(volume):
    net = tiny_net()
    reference = SlidingWindowPredictor(net, ROI).labels(volume)
    fast = SlidingWindowPredictor(net, ROI, InferenceOptions(precision="bf16")).labels(volume)
    assert float((fast == reference).float().mean()) >= 0.99


def test_first_conv_runs_in_float32_under_bf16(volume):
    net = tiny_net()
    seen = []
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    first.register_forward_hook(lambda m, a, out: seen.append((a[0].dtype, out.dtype)))
    SlidingWindowPredictor(net, ROI, InferenceOptions(precision="bf16")).logits(volume)
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)
    assert not torch.is_autocast_enabled("cpu")  # hooks restored the state


def test_window_never_smaller_than_training_crop():
    with pytest.raises(ValueError, match="training crop"):
        SlidingWindowPredictor(tiny_net(), ROI, InferenceOptions(window=(8, 16, 16)))
    with pytest.raises(ValueError, match="precision"):
        InferenceOptions(precision="fp8")


def test_larger_window_runs_fewer_windows(volume):
    shape = tuple(volume.shape[1:])
    window = covering_window(shape, ROI, multiple=4)
    assert all(w >= max(s, r) and w % 4 == 0 for w, s, r in zip(window, shape, ROI))
    small, large = window_plan(shape, ROI), window_plan(shape, window)
    assert large.windows == 1 < small.windows
    assert large.overlap_share < small.overlap_share
    out = SlidingWindowPredictor(tiny_net(), ROI, InferenceOptions(window=window)).logits(volume)
    assert out.shape[2:] == volume.shape[1:]


def test_window_plan_matches_monai_count():
    # 197x233x189 at roi 96, overlap 0.25: 3 windows per axis (what MONAI runs for a 1 mm brain).
    plan = window_plan((197, 233, 189), (96, 96, 96), 0.25)
    assert plan.windows == 27
    assert plan.voxels_processed == 27 * 96**3
    assert 0 < plan.overlap_share < 1
    assert window_plan((40, 40, 40), (64, 64, 64)).windows == 1  # padded up to one window


def test_flops_scale_with_window_voxels():
    net = tiny_net()
    small, large = network_flops(net, (16, 16, 16)), network_flops(net, (32, 32, 32))
    assert small > 0 and large == pytest.approx(8 * small, rel=0.01)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
    assert isinstance(bf16_supported("cpu"), bool)


def test_device_is_one_run_config_key_and_an_api_setting():
    from server.api.config import ApiSettings
    from shared.runconfig import RunConfig, run_config_defaults

    assert run_config_defaults()["device"] == "auto" and ApiSettings().device == "auto"
    assert RunConfig.from_run_config({"device": "cuda:1"}).device == "cuda:1"
    with pytest.raises(ValueError, match="device"):
        RunConfig.from_run_config({"device": "tpu"})
    assert ApiSettings().inference_precision == "fp32"


def test_windows_per_pass_fills_the_budget_evenly():
    from shared.inferer import WINDOW_PASS_VOXELS, windows_per_pass

    # torch: small passes (its activations stay in cache); the exported runtimes: large ones
    assert WINDOW_PASS_VOXELS == {"torch": 2 * 64**3, "cuda": 16 * 64**3, "openvino": 16 * 64**3,
                                  "onnxruntime": 16 * 64**3}
    assert windows_per_pass(12, (64, 64, 64)) == 2
    assert windows_per_pass(27, (96, 96, 96)) == 1
    assert windows_per_pass(12, (64, 64, 64), "openvino") == 12
    assert windows_per_pass(17, (64, 64, 64), "openvino") == 9  # two passes of 9, not 16 + 1
    assert windows_per_pass(27, (96, 96, 96), "onnxruntime") == windows_per_pass(27, (96, 96, 96), "cuda") == 4
    assert windows_per_pass(5, (32, 32, 32)) == 5  # 16 fit: one pass
    assert windows_per_pass(1, (64, 64, 64)) == 1
    assert windows_per_pass(5, (512, 512, 512)) == 1  # one window over the budget still runs


def test_automatic_windows_per_pass_gives_the_labels_of_two_per_pass():
    """Instance norm is per window: batching more windows per forward changes no label."""
    from shared.inferer import InferenceOptions, SlidingWindowPredictor
    from shared.model import build_unet

    torch.manual_seed(0)
    net = build_unet(channels=(4, 8), strides=(2,)).eval()
    image = torch.rand(1, 40, 44, 36) * 300 - 100
    two = SlidingWindowPredictor(net, (16, 16, 16), InferenceOptions(sw_batch_size=2)).logits(image)
    auto = SlidingWindowPredictor(net, (16, 16, 16), InferenceOptions()).logits(image)
    assert (two.argmax(1) == auto.argmax(1)).all()
    assert torch.allclose(two, auto, atol=1e-4)


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
@pytest.mark.parametrize("kwargs", [{}, {"num_res_units": 1, "input_norm": True}], ids=["unet", "input-norm-residual"])
def test_exported_backend_matches_torch_and_keeps_the_invariance(volume, kwargs, backend):
    pytest.importorskip(backend)  # installed with .[dev]; optional backends for users
    net = tiny_net(**kwargs)
    reference = SlidingWindowPredictor(net, ROI).logits(volume)
    # The input norm is a forward pre-hook: the conversion must trace it (else the invariance below fails).
    predictor = SlidingWindowPredictor(tiny_net(**kwargs), ROI, InferenceOptions(backend=backend))
    fast = predictor.logits(volume)
    assert fast.shape == reference.shape and fast.dtype == torch.float32
    # Other kernels, other summation order: measured max |diff| 5e-4 on logits of O(0.1), labels 99.9993 %
    assert float((fast - reference).abs().max()) < 5e-3
    assert float((fast.argmax(1) == reference.argmax(1)).float().mean()) >= 0.999
    base = predictor.labels(volume)
    agreement = [float((predictor.labels(s * volume + b) == base).float().mean()) for s, b in AFFINES]
    assert min(agreement) >= 0.9999, agreement  # measured 1.0000, as the torch float32 path
    assert len(predictor._compiled) <= 2  # one compiled model per window-batch shape, reused across volumes


def test_exported_backends_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="precision fp32"):
        InferenceOptions(backend="openvino", precision="bf16")
    with pytest.raises(ValueError, match="no channels_last"):
        InferenceOptions(backend="onnxruntime", channels_last=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        InferenceOptions(backend="onnx")
