"""The model factory, and the invariance the product rests on, measured."""

import warnings

import pytest
import torch
from torch import nn

from shared.model import ModelConfig, build_unet, norm_parameter_names
from shared.synth import synthesize_subject
from shared.training import predict_labels

# (s, b) pairs spanning the scanners of the demo and beyond.
AFFINES = [(0.25, -500.0), (0.01, -3.0), (4.0, 300.0), (0.2, 1000.0), (5.0, -1000.0)]


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
@pytest.mark.parametrize("shape", [(1, 1, 16, 16, 16), (2, 1, 32, 24, 16)])
def test_output_shape(norm, shape):
    net = build_unet(norm=norm, channels=(8, 16, 32), strides=(2, 2))
    assert net(torch.zeros(shape)).shape == (shape[0], 4, *shape[2:])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"norm": "layer"}, "norm"),
        ({"channels": (8, 16), "strides": (2, 2)}, "strides"),
        ({"norm": "group", "groups": 3}, "groups"),
        ({"padding_mode": "edge"}, "padding_mode"),
    ],
)
def test_ill_hyper_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_convolutions_pad_by_replicate_and_no_residual_units():
    net = build_unet()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(c.padding_mode == "replicate" for c in convs)
    assert not any(type(m).__name__ == "ResidualUnit" for m in net.modules())


def test_configurations_that_break_invariance_warn():
    with pytest.warns(UserWarning, match="not invariant"):
        build_unet(num_res_units=2)


def test_fedbn_norm_keys():
    assert norm_parameter_names(build_unet(norm="instance")) == set()  # affine-free IN has no state
    bn_keys = norm_parameter_names(build_unet(norm="batch"))
    assert bn_keys and all(
        k.endswith(("weight", "bias", "running_mean", "running_var", "num_batches_tracked")) for k in bn_keys
    )
    assert bn_keys < set(build_unet(norm="batch").state_dict())


@pytest.mark.parametrize("seed", range(5))
def test_instance_norm_layer_cancels_affine(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 10, 12, 8, generator=g, dtype=torch.float64) * 50 + 20
    s = float(torch.empty(1).uniform_(0.05, 20, generator=g))
    b = float(torch.empty(1).uniform_(-1000, 1000, generator=g))
    norm = nn.InstanceNorm3d(3, eps=1e-5).double()
    diff = (norm(s * x + b) - norm(x)).abs().max().item()
    assert diff < 1e-6, f"IN output changed by {diff:.2e} under s={s:.3f}, b={b:.1f}"


def test_groupnorm_with_one_channel_per_group_is_instance_norm():
    x = torch.randn(2, 6, 8, 8, 8)
    gn, inn = nn.GroupNorm(6, 6, affine=False), nn.InstanceNorm3d(6)
    assert torch.allclose(gn(x), inn(x), atol=1e-5)


@pytest.fixture(scope="module")
def volume():
    return torch.from_numpy(synthesize_subject(4, resolution=4).signal)[None]


def label_agreement(net: nn.Module, volume: torch.Tensor) -> list[float]:
    """Share of voxels whose predicted label is unchanged under each (s, b) of AFFINES."""
    base = predict_labels(net, volume, (32, 32, 32))
    return [float((predict_labels(net, s * volume + b, (32, 32, 32)) == base).float().mean()) for s, b in AFFINES]


def random_net(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_unet(**kwargs).eval()


def test_instance_norm_model_prediction_is_invariant(volume):
    agreement = label_agreement(random_net(norm="instance"), volume)
    # Measured here: 1.0000 for every (s, b); allow float noise at argmax ties.
    assert min(agreement) >= 0.999, f"IN model label agreement {agreement}"


def test_batch_norm_model_in_eval_mode_is_not_invariant(volume):
    agreement = label_agreement(random_net(norm="batch"), volume)
    # Measured here: 0.28-0.57. Running statistics do not follow the scanner's (s, b).
    assert max(agreement) < 0.9, f"BN model label agreement {agreement}"


@pytest.mark.parametrize(
    "kwargs,why",
    [
        ({"num_res_units": 2}, "residual units carry the raw input past IN"),
        ({"padding_mode": "zeros"}, "zero padding is not shifted by b"),
    ],
)
def test_stock_monai_choices_break_invariance(volume, kwargs, why):
    agreement = label_agreement(random_net(norm="instance", **kwargs), volume)
    # Measured here: residual 0.19-0.63, zero padding 0.63-0.97.
    assert min(agreement) < 0.99, f"expected a visible change ({why}); got {agreement}"


def test_input_norm_makes_residual_units_invariant(volume):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not invariant" warning for this configuration
        torch.manual_seed(0)
        net = build_unet(num_res_units=2, input_norm=True).eval()
    agreement = label_agreement(net, volume)
    assert min(agreement) >= 0.999, f"input-norm residual UNet label agreement {agreement}"
    # Parameter-free: the same state-dict keys as the network without it (FedBN names, checkpoints).
    assert set(net.state_dict()) == set(random_net(num_res_units=2).state_dict())


def test_input_norm_survives_pickling_and_the_registry(tmp_path):
    import pickle

    from shared.data import DataConfig
    from shared.registry import load_model, save_model

    torch.manual_seed(0)
    mcfg = ModelConfig(channels=(4, 8), strides=(2,), num_res_units=1, input_norm=True)
    net = build_unet(mcfg).eval()
    x = torch.randn(1, 1, 16, 16, 16) * 40 + 300
    expected = net(x)
    save_model(tmp_path, "v1", net.state_dict(), mcfg, DataConfig(), kind="pooled")
    loaded, meta = load_model(tmp_path, "v1")
    assert meta["model_config"]["input_norm"] is True
    for other in (loaded.eval(), pickle.loads(pickle.dumps(net))):
        torch.testing.assert_close(other(x), expected)
    # Without the hook the same weights give another answer: the flag is what is restored.
    plain = random_net(channels=(4, 8), strides=(2,), num_res_units=1)
    plain.load_state_dict(net.state_dict())
    assert not torch.allclose(plain(x), expected, atol=1e-3)
