"""One typed schema for a run: every run-config key with its alias, default, bounds and help, in one place.

Flower hands both apps a flat ``run_config`` dict (pyproject ``[tool.flwr.app.config]`` merged with
``flwr run --run-config`` overrides); the ``fedmri federate | train | ablation`` flags, the registry
metadata and the ablation variants are all derived from :class:`RunConfig`. Keys are kebab-case
(``roi-size``), fields snake_case (``roi_size``), flags ``--roi-size``: one name per concept.

Adding a key: add one field below (alias, default, bounds, help, ``cli`` group), then use it.
``tests/server/federation/test_config.py`` checks that pyproject declares it with the same default.

Model and preprocessing defaults are those of :class:`shared.model.ModelConfig` and
:class:`shared.data.DataConfig`, the factories' own arguments, so they are written once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.data import DataConfig
from shared.model import NORMS, ModelConfig
from shared.training import DEFAULT_CLASS_WEIGHTS, DEFAULT_LR_SCHEDULE, LR_SCHEDULES

__all__ = ["CLI_GROUPS", "STRATEGIES", "FAULTS", "RunConfig", "run_config_defaults"]

STRATEGIES = ("fedavg", "fedprox", "fedadam")
FAULTS = ("nan", "inf", "shape")
# Which subcommands offer a field as a flag: "model" and "data" everywhere a model is trained,
# "train" for the optimiser, "federation" for `fedmri federate`; fields without a group are set
# by the launcher (folders, site list, run name).
CLI_GROUPS = ("model", "data", "train", "federation")


def _split(kind: type, what: str):
    """Flower run config holds scalars only: tuples travel as comma-separated strings."""

    def parse(value: Any) -> Any:
        if isinstance(value, str):
            return tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (kind(value),)
        return value

    def safe(value: Any) -> Any:
        try:
            return parse(value)
        except ValueError:
            raise ValueError(f"expected comma-separated {what}, got {value!r}") from None

    return BeforeValidator(safe)


def _join(values: tuple) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


IntList = Annotated[tuple[int, ...], _split(int, "integers"), PlainSerializer(_join, return_type=str)]
FloatList = Annotated[tuple[float, ...], _split(float, "numbers"), PlainSerializer(_join, return_type=str)]
NameList = Annotated[tuple[str, ...], _split(str, "names"), PlainSerializer(_join, return_type=str)]
Norm = Annotated[Literal[NORMS], BeforeValidator(_lower)]
Strategy = Annotated[Literal[STRATEGIES], BeforeValidator(_lower)]
Schedule = Annotated[Literal[LR_SCHEDULES], BeforeValidator(_lower)]
CHECKPOINT_CHOICES = ("last", "best-val")


def _tristate(value: Any) -> Any:
    return str(value).lower() if isinstance(value, (bool, str)) else value


Tristate = Annotated[Literal["auto", "true", "false"], BeforeValidator(_tristate)]


def _field(default: Any, help: str, cli: str | None = None, flags: tuple[str, ...] = (), **bounds) -> Any:
    """A run-config field: its help text, CLI group and extra flag spellings travel with it."""
    extra = {"cli": cli, "flags": list(flags)} if cli else None
    return Field(default, description=help, json_schema_extra=extra, **bounds)


class RunConfig(BaseModel):
    """A federated (or centralised) training run, validated; build with :meth:`from_run_config`."""

    model_config = ConfigDict(
        alias_generator=lambda name: name.replace("_", "-"),
        populate_by_name=True,
        frozen=True,
        extra="forbid",
    )

    # Federation
    num_server_rounds: int = _field(3, "federated rounds", "federation", ("--rounds",), ge=1)
    local_epochs: int = _field(1, "epochs each site trains per round", "federation", ge=1)
    strategy: Strategy = _field(
        "fedavg", "server strategy: fedavg, fedprox (proximal-mu) or fedadam (server-lr)", "federation"
    )
    fedbn: bool = _field(False, "keep normalisation layers local at each site (FedBN)", "federation")
    proximal_mu: float = _field(0.01, "FedProx proximal weight", "federation", ge=0)
    server_lr: float = _field(0.01, "FedAdam server learning rate (eta)", "federation", gt=0)
    min_sites: int = _field(
        2,
        "fewest valid site updates to aggregate a round (else the global model is kept); "
        "also the sites awaited at start",
        "federation",
        ge=1,
    )
    round_timeout: float = _field(600.0, "seconds the server waits for site replies per round", "federation", gt=0)
    hd95: bool = _field(False, "also compute HD95 in federated evaluation", "federation")
    eval_with_train: Tristate = _field(
        "auto", "sites send validation metrics with the next round's train reply, one message per site and round "
        "(auto: on in native mode, where each message costs a fresh ClientApp process; off in simulation)",
        "federation")
    poll_interval: float = _field(
        0.2, "seconds between the ServerApp's checks for replies from the SuperLink (Flower's own default is 3; "
        "a simulation checks its in-process state every 0.01 s)", "federation", gt=0)
    site_cache: bool = _field(
        True, "sites keep preprocessed volumes on their own disk (node config cache-dir, default "
        "<data-dir>/.fedmri-cache)", "federation")
    warm_worker: bool = _field(
        True, "deployment: each site keeps a warm worker process that the per-message ClientApp process hands its "
        "work to (client/worker.py); off: every message does its work in its own fresh process", "federation")
    worker_idle_timeout: float = _field(
        600.0, "seconds a site's warm worker waits for the next message before it exits", "federation", gt=0)
    select_checkpoint: Literal[CHECKPOINT_CHOICES] = _field(
        "last", "which round's checkpoint is served: the last, or the best federated validation Dice "
        "(held-out training cases, never test cases)", "federation")
    fault_inject: str = _field(
        "", "'<site>:nan|inf|shape': that site sends a corrupt update (fault drills)", "federation"
    )
    # Network
    norm: Norm = _field(ModelConfig.norm, "normalisation layers of the UNet: instance, batch or group", "model")
    groups: int = _field(ModelConfig.groups, "groups for norm=group", "model", ge=1)
    norm_affine: bool = _field(
        ModelConfig.norm_affine, "instance norm with learnable per-channel gamma, beta (local with --fedbn)", "model"
    )
    channels: IntList = _field(ModelConfig.channels, "UNet channels per level, e.g. 16,32,64,128", "model")
    res_units: int = _field(
        ModelConfig.num_res_units, "MONAI residual units per UNet block (more capacity; needs --input-norm with "
        "instance norm)", "model", ge=0, le=4)
    input_norm: bool = _field(
        ModelConfig.input_norm, "instance-normalise each input window before the first convolution: keeps the "
        "network invariant to s*x+b whatever follows (residual units too)", "model")
    # Preprocessing and sampling
    zscore: bool = _field(DataConfig.zscore, "z-score each input volume (ablation; IN does not need it)", "data")
    roi_size: IntList = _field(DataConfig.roi_size, "training crop and sliding window (voxels)", "data", ("--roi",))
    spacing: FloatList = _field(DataConfig.spacing, "resample to this voxel size (mm)", "data")
    batch_size: int = _field(DataConfig.batch_size, "volumes per optimiser step", "data", ge=1)
    samples_per_volume: int = _field(DataConfig.samples_per_volume, "random crops per loaded volume", "data", ge=1)
    crop_ratios: FloatList = _field(
        DataConfig.crop_ratios, "relative chance that a crop is centred on background, GM, WM, lesion", "data")
    gamma_prob: float = _field(
        DataConfig.gamma_prob, "chance of a random range-preserving gamma curve per crop", "data", ge=0, le=1)
    bias_field_prob: float = _field(
        DataConfig.bias_field_prob, "chance of a random smooth bias field (above the crop's minimum) per crop", "data",
        ge=0, le=1)
    spatial_prob: float = _field(
        DataConfig.spatial_prob, "chance of a random rotation (15 deg) and scaling (15 %) per crop", "data",
        ge=0, le=1)
    lesion_paste_prob: float = _field(
        DataConfig.lesion_paste_prob, "chance per volume draw of copying its lesion to 1-2 white-matter places",
        "data", ge=0, le=1)
    # Optimiser
    lr: float = _field(0.001, "client Adam learning rate", "train", gt=0)
    lr_schedule: Schedule = _field(
        DEFAULT_LR_SCHEDULE, "learning-rate decay over all rounds: constant, poly or cosine", "train")
    class_weights: FloatList = _field(
        DEFAULT_CLASS_WEIGHTS, "cross-entropy weight of background, GM, WM, lesion (Dice stays unweighted)", "train")
    max_steps: int = _field(0, "cap on optimiser steps per site and round (0: whole epochs)", "train", ge=0)
    augment: bool = _field(
        False,
        "non-linear intensity augmentation in local training: random gamma, smooth bias field, Gaussian noise "
        "(MONAI RandAdjustContrastd, RandBiasFieldd, RandGaussianNoised; shared.augment)",
        "train",
    )
    seed: int = _field(0, "seeds model init, splits and sampling", "train", ge=0)
    device: str = _field(
        "auto", "where the network trains and predicts: auto (CUDA when available), cpu, cuda[:N]", "train",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
    )
    # Set by the launcher
    data_dir: str = Field("", description="simulation: absolute folder of site folders")
    sites: NameList = Field((), description="expected sites (simulation: one virtual node each)")
    out_dir: str = Field("", description="absolute runs folder; checkpoints in <out-dir>/registry")
    run_name: str = Field(
        "", description="registry prefix and run folder name", pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,100})?$"
    )
    resume: bool = Field(False, description="continue the run from its last checkpoint")
    site_identities: str = Field(
        "", description="absolute JSON file mapping node id -> site name, written by the launcher from the "
        "registered SuperNode keys; replies that contradict it are refused")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation in (int, float):
            raise ValueError(f"expected a number, got {value!r}")
        return value

    @field_validator("data_dir", "out_dir", "site_identities")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if value and not Path(value).is_absolute():
            raise ValueError(f"must be an absolute path (Flower unpacks the app elsewhere), got {value!r}")
        return value

    @field_validator("fault_inject")
    @classmethod
    def _fault(cls, value: str) -> str:
        if value and (":" not in value or value.rsplit(":", 1)[1] not in FAULTS):
            raise ValueError(f"expected '<site>:{'|'.join(FAULTS)}', got {value!r}")
        return value

    @field_validator("sites")
    @classmethod
    def _unique_sites(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate site names in {','.join(value)!r}")
        return value

    @field_validator("class_weights")
    @classmethod
    def _class_weights(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) != len(DEFAULT_CLASS_WEIGHTS) or min(value) <= 0:
            raise ValueError(f"expected {len(DEFAULT_CLASS_WEIGHTS)} positive numbers, got {_join(value)!r}")
        return value

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) < 2 or min(value) < 1:
            raise ValueError(f"expected at least two positive integers, got {_join(value)!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.sites and self.min_sites > len(self.sites):
            raise ValueError(f"'min-sites' = {self.min_sites} exceeds the {len(self.sites)} sites in 'sites'")
        if self.norm == "instance" and self.res_units > 0 and not self.input_norm:
            raise ValueError("'res-units' > 0 needs 'input-norm' = true: residual units carry the raw input past "
                             "the first instance norm, so the model would not be invariant to s*x+b")
        self.network_config()  # the factories check the rest (roi >= 8, groups divide channels, ...)
        self.data_config()
        return self

    @classmethod
    def from_run_config(cls, run_config: Mapping | None = None, **overrides: Any) -> RunConfig:
        """Validate a flat kebab-case dict (plus keyword overrides); ``ValueError`` names the bad key."""
        raw = {**dict(run_config or {}), **{k.replace("_", "-"): v for k, v in overrides.items()}}
        unknown = sorted(set(raw) - {f.alias for f in cls.model_fields.values()})
        if unknown:
            raise ValueError(f"unknown run config key(s) {unknown}; known keys: {sorted(run_config_defaults())}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ValueError("; ".join(_describe(err) for err in exc.errors())) from None

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with some fields changed (snake_case or kebab-case names)."""
        return self.from_run_config({**self.to_run_config(), **{k.replace("_", "-"): v for k, v in changes.items()}})

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Back to Flower's flat kebab-case dict of scalars."""
        return self.model_dump(by_alias=True)

    def network_config(self) -> ModelConfig:
        return ModelConfig(
            norm=self.norm,
            channels=self.channels,
            strides=(2,) * (len(self.channels) - 1),
            groups=self.groups,
            norm_affine=self.norm_affine,
            num_res_units=self.res_units,
            input_norm=self.input_norm,
        )

    def data_config(self) -> DataConfig:
        return DataConfig(
            spacing=self.spacing,
            roi_size=self.roi_size,
            batch_size=self.batch_size,
            samples_per_volume=self.samples_per_volume,
            crop_ratios=self.crop_ratios,
            gamma_prob=self.gamma_prob,
            bias_field_prob=self.bias_field_prob,
            spatial_prob=self.spatial_prob,
            lesion_paste_prob=self.lesion_paste_prob,
            zscore=self.zscore,
        )

    def fault_for(self, site: str) -> str | None:
        """The fault this site must inject (``"nan"``, ``"inf"``, ``"shape"``), if any."""
        if not self.fault_inject:
            return None
        target, kind = self.fault_inject.rsplit(":", 1)
        return kind if target == site else None


def _describe(err: dict) -> str:
    where = err["loc"][0] if err["loc"] else None
    key = f"run config {where!r}" if where else "run config"
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    got = f" (got {value!r})" if where and not isinstance(value, dict) and "got " not in message else ""
    return f"{key}: {message}{got}"


def run_config_defaults() -> dict[str, bool | int | float | str]:
    """Every key with its default, as pyproject ``[tool.flwr.app.config]`` must declare it."""
    return RunConfig().to_run_config()
