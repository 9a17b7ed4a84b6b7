"""Instance norm with learnable per-channel gamma, beta (``norm-affine``): local under FedBN, still invariant."""

from __future__ import annotations

import torch
from torch import nn

from shared.model import build_unet, norm_parameter_names
from shared.runconfig import RunConfig
from shared.synth import synthesize_subject
from shared.training import predict_labels

AFFINES = [(0.2, 1000.0), (5.0, -1000.0), (0.25, 500.0), (4.0, -300.0)]


def test_affine_instance_norm_has_local_parameters_and_stays_invariant():
    cfg = RunConfig.from_run_config({"norm-affine": "true", "channels": "8,16,32", "fedbn": True})
    assert cfg.network_config().norm_affine and cfg.to_run_config()["norm-affine"] is True
    torch.manual_seed(0)
    net = build_unet(cfg.network_config())
    keys = norm_parameter_names(net)
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(m.affine for m in norms)
    assert keys == {f"{name}.{p}" for name, m in net.named_modules() if isinstance(m, nn.InstanceNorm3d)
                    for p in ("weight", "bias")}
    assert norm_parameter_names(build_unet(norm="instance")) == set()  # the default keeps nothing local
    with torch.no_grad():  # non-trivial gamma, beta: they act after the normalisation
        for m in norms:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    net.eval()
    volume = torch.from_numpy(synthesize_subject(4, resolution=4).signal)[None]
    base = predict_labels(net, volume, (32, 32, 32))
    agreement = [float((predict_labels(net, s * volume + b, (32, 32, 32)) == base).float().mean())
                 for s, b in AFFINES]
    assert min(agreement) >= 0.999, agreement
