"""The segmentation network factory: one place, so every component's state-dict keys match.

For instance norm to cancel a scanner's ``s*x + b`` everything before the first IN must commute
with that map: convolutions pad by replicate (zero padding is not shifted by ``b``) and no raw
input may skip past the first IN (``num_res_units=0``; MONAI's residual units add the input back).
With ``input_norm=True`` the input itself is instance-normalised first, so whatever follows is
invariant, residual units included: the way to a larger network (``--res-units 2 --input-norm``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from torch import nn
from torch.nn import functional as F

__all__ = ["NORMS", "ModelConfig", "build_unet", "norm_parameter_names", "split_norm_state", "count_parameters"]

NORMS = ("instance", "batch", "group")


@dataclass
class ModelConfig:
    """Network architecture; stored next to every checkpoint so the API can rebuild it.

    Args:
        norm: ``"instance"`` (default; removes per-volume affine intensity), ``"batch"`` or
            ``"group"``.
        channels: feature channels per UNet level.
        strides: downsampling per level; ``len(strides) == len(channels) - 1``.
        num_res_units: MONAI residual units per block; must stay 0 for affine invariance unless
            ``input_norm`` is set.
        groups: groups for ``norm="group"`` (``groups == channels[0]`` would be instance norm).
        padding_mode: convolution padding; ``"replicate"`` or ``"reflect"`` keep invariance.
        in_channels: input channels (1: a single MRI contrast).
        out_channels: classes including background.
        dropout: dropout probability.
        norm_affine: instance norm with learnable per-channel scale and offset (gamma, beta;
            ``affine=True``). Still invariant to ``s*x + b`` (they act after the normalisation); with
            FedBN they stay at each site: conditional instance norm, one (gamma, beta) set per site.
        input_norm: instance-normalise the input volume (each window) before the first convolution.
            No parameters, so state-dict keys stay MONAI's; makes residual units (and zero padding)
            invariant to ``s*x + b`` too.
    """

    norm: str = "instance"
    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 0
    groups: int = 4
    padding_mode: str = "replicate"
    in_channels: int = 1
    out_channels: int = 4
    dropout: float = 0.0
    norm_affine: bool = False
    input_norm: bool = False

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.strides = tuple(int(s) for s in self.strides)
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides must have length len(channels) - 1 = {len(self.channels) - 1}, got {len(self.strides)}"
            )
        if self.padding_mode not in ("replicate", "reflect", "zeros", "circular"):
            raise ValueError(f"padding_mode must be replicate, reflect, zeros or circular, got {self.padding_mode!r}")
        if self.norm == "group" and any(c % self.groups for c in self.channels):
            raise ValueError(f"groups={self.groups} must divide every entry of channels={self.channels}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_unet(config: ModelConfig | None = None, **overrides) -> nn.Module:
    """Build MONAI's 3-D ``UNet`` with the configured normalisation and padding.

    Examples::

        net = build_unet(norm="instance")
        logits = net(torch.zeros(1, 1, 64, 64, 64))  # (1, 4, 64, 64, 64)
    """
    from monai.networks.nets import UNet

    cfg = config or ModelConfig(**overrides)
    if config is not None and overrides:
        cfg = ModelConfig(**{**cfg.to_dict(), **overrides})
    if cfg.norm == "instance" and not cfg.input_norm and (cfg.num_res_units > 0 or cfg.padding_mode == "zeros"):
        warnings.warn(
            "instance-norm UNet with residual units or zero padding is not invariant to s*x+b",
            stacklevel=2,
        )
    instance = ("instance", {"affine": True}) if cfg.norm_affine else "instance"
    norm = {"instance": instance, "batch": "batch", "group": ("group", {"num_groups": cfg.groups})}[cfg.norm]
    net = UNet(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=cfg.channels,
        strides=cfg.strides,
        num_res_units=cfg.num_res_units,
        norm=norm,
        dropout=cfg.dropout,
    )
    # MONAI's Convolution block has no padding_mode argument; nn.Conv3d honours the attribute.
    for module in net.modules():
        if isinstance(module, nn.Conv3d):
            module.padding_mode = cfg.padding_mode
    if cfg.input_norm:  # a hook, not a wrapper: state-dict keys, FedBN names and exports stay MONAI's
        net.register_forward_pre_hook(_normalise_input)
    return net


def _normalise_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of an ``input_norm`` network: instance norm of its input (module-level: picklable)."""
    return (F.instance_norm(args[0], eps=INPUT_NORM_EPS), *args[1:])


# Added to each window's input variance, which for scanner intensities (s 0.25..4 on a 0..1000 range) dwarfs it.
INPUT_NORM_EPS = 1e-5


def norm_parameter_names(model: nn.Module) -> set[str]:
    """State-dict keys that belong to normalisation layers (kept local by FedBN)."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, norm_types):
            for key in module.state_dict():
                names.add(f"{module_name}.{key}" if module_name else key)
    return names


def split_norm_state(state: Mapping, norm_keys: set[str]) -> tuple[dict, dict]:
    """Split a state dict into (shared, normalisation) parts; FedBN keeps the second local."""
    shared = {k: v for k, v in state.items() if k not in norm_keys}
    local = {k: v for k, v in state.items() if k in norm_keys}
    return shared, local


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
