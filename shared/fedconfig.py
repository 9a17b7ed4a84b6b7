"""Federated run configuration: the Flower run-config keys both apps read, parsed and checked once.

Flower hands each app a flat ``run_config`` dict (pyproject ``[tool.flwr.app.config]`` merged
with ``flwr run --run-config`` overrides). ``FederationConfig.from_run_config`` turns it into
typed fields and raises ``ValueError`` naming the bad key. Plain dicts only: no Flower types.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from shared.data import DataConfig
from shared.model import NORMS, ModelConfig

__all__ = ["RUN_CONFIG_DEFAULTS", "STRATEGIES", "FederationConfig", "split_norm_state"]

STRATEGIES = ("fedavg", "fedprox", "fedadam")

# Kebab-case keys exactly as in pyproject.toml [tool.flwr.app.config]; CPU-sized defaults.
RUN_CONFIG_DEFAULTS: dict[str, bool | int | float | str] = {
    "num-server-rounds": 3,
    "local-epochs": 1,
    "strategy": "fedavg",
    "fedbn": False,
    "proximal-mu": 0.01,
    "server-lr": 0.01,
    "norm": "instance",
    "groups": 4,
    "zscore": False,
    "channels": "8,16,32,64",
    "roi-size": "64,64,64",
    "spacing": "2,2,2",
    "batch-size": 2,
    "samples-per-volume": 2,
    "lr": 0.001,
    "max-steps": 0,
    "seed": 0,
    "min-sites": 2,
    "round-timeout": 600,
    "hd95": False,
    "data-dir": "",
    "sites": "",
    "out-dir": "",
    "run-name": "",
    "resume": False,
    "fault-inject": "",
}

_FAULTS = ("nan", "inf", "shape")


def _ints(key: str, value) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in str(value).split(","))
    except ValueError:
        raise ValueError(f"run config {key!r}: expected comma-separated integers, got {value!r}") from None


def _floats(key: str, value) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in str(value).split(","))
    except ValueError:
        raise ValueError(f"run config {key!r}: expected comma-separated numbers, got {value!r}") from None


def _bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"run config {key!r}: expected true or false, got {value!r}")


def _int(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"run config {key!r}: expected an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"run config {key!r}: expected an integer, got {value!r}") from None
    if number != float(value) or number < minimum:
        raise ValueError(f"run config {key!r}: expected an integer >= {minimum}, got {value!r}")
    return number


def _float(key: str, value, positive: bool = True) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"run config {key!r}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or number != number or (positive and number <= 0) or number < 0:
        raise ValueError(f"run config {key!r}: expected a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return number


def _path(key: str, value) -> str:
    text = str(value)
    if text and not Path(text).is_absolute():
        raise ValueError(f"run config {key!r}: must be an absolute path (Flower unpacks the app elsewhere), got {text!r}")
    return text


@dataclass(frozen=True)
class FederationConfig:
    """Typed view of the run config; field names are the keys with ``-`` replaced by ``_``.

    Args:
        num_server_rounds: federated rounds.
        local_epochs: epochs each site trains per round.
        strategy: ``"fedavg"``, ``"fedprox"`` (uses ``proximal_mu``) or ``"fedadam"`` (``server_lr``).
        fedbn: keep normalisation-layer parameters local at each site (FedBN).
        norm, groups, channels: network (``shared.model.ModelConfig``).
        zscore, roi_size, spacing, batch_size, samples_per_volume: preprocessing (``DataConfig``).
        lr: client Adam learning rate. max_steps: cap on optimiser steps per round (0: none).
        seed: seeds model init, splits and sampling.
        min_sites: fewest sites that must return a valid update for a round to be aggregated.
        round_timeout: seconds the server waits for replies in a round.
        hd95: also compute HD95 in federated evaluation.
        data_dir: absolute folder of site folders (simulation) - deployment SuperNodes bring their own.
        sites: comma-separated expected site names (simulation: partition ``i`` is ``sites[i]``).
        out_dir: absolute runs folder; checkpoints go to ``out_dir/registry``.
        run_name: registry prefix and run-folder name. resume: continue from its last checkpoint.
        fault_inject: ``"<site>:nan|inf|shape"`` makes that site send a corrupt update (fault drills, tests).
    """

    num_server_rounds: int
    local_epochs: int
    strategy: str
    fedbn: bool
    proximal_mu: float
    server_lr: float
    norm: str
    groups: int
    zscore: bool
    channels: tuple[int, ...]
    roi_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    batch_size: int
    samples_per_volume: int
    lr: float
    max_steps: int
    seed: int
    min_sites: int
    round_timeout: float
    hd95: bool
    data_dir: str
    sites: tuple[str, ...]
    out_dir: str
    run_name: str
    resume: bool
    fault_inject: str

    @classmethod
    def from_run_config(cls, run_config: Mapping) -> FederationConfig:
        """Merge ``run_config`` over the defaults and check every value."""
        unknown = sorted(set(run_config) - set(RUN_CONFIG_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown run config key(s) {unknown}; known keys: {sorted(RUN_CONFIG_DEFAULTS)}")
        raw = {**RUN_CONFIG_DEFAULTS, **dict(run_config)}
        strategy = str(raw["strategy"]).lower()
        if strategy not in STRATEGIES:
            raise ValueError(f"run config 'strategy': expected one of {STRATEGIES}, got {raw['strategy']!r}")
        norm = str(raw["norm"]).lower()
        if norm not in NORMS:
            raise ValueError(f"run config 'norm': expected one of {NORMS}, got {raw['norm']!r}")
        fault = str(raw["fault-inject"])
        if fault and (":" not in fault or fault.rsplit(":", 1)[1] not in _FAULTS):
            raise ValueError(f"run config 'fault-inject': expected '<site>:{'|'.join(_FAULTS)}', got {fault!r}")
        sites = tuple(s.strip() for s in str(raw["sites"]).split(",") if s.strip())
        if len(set(sites)) != len(sites):
            raise ValueError(f"run config 'sites': duplicate site names in {raw['sites']!r}")
        cfg = cls(
            num_server_rounds=_int("num-server-rounds", raw["num-server-rounds"], 1),
            local_epochs=_int("local-epochs", raw["local-epochs"], 1),
            strategy=strategy,
            fedbn=_bool("fedbn", raw["fedbn"]),
            proximal_mu=_float("proximal-mu", raw["proximal-mu"], positive=False),
            server_lr=_float("server-lr", raw["server-lr"]),
            norm=norm,
            groups=_int("groups", raw["groups"], 1),
            zscore=_bool("zscore", raw["zscore"]),
            channels=_ints("channels", raw["channels"]),
            roi_size=_ints("roi-size", raw["roi-size"]),
            spacing=_floats("spacing", raw["spacing"]),
            batch_size=_int("batch-size", raw["batch-size"], 1),
            samples_per_volume=_int("samples-per-volume", raw["samples-per-volume"], 1),
            lr=_float("lr", raw["lr"]),
            max_steps=_int("max-steps", raw["max-steps"], 0),
            seed=_int("seed", raw["seed"], 0),
            min_sites=_int("min-sites", raw["min-sites"], 1),
            round_timeout=_float("round-timeout", raw["round-timeout"]),
            hd95=_bool("hd95", raw["hd95"]),
            data_dir=_path("data-dir", raw["data-dir"]),
            sites=sites,
            out_dir=_path("out-dir", raw["out-dir"]),
            run_name=str(raw["run-name"]),
            resume=_bool("resume", raw["resume"]),
            fault_inject=fault,
        )
        if cfg.run_name and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$", cfg.run_name):
            raise ValueError(f"run config 'run-name': use letters, digits, '.', '_' or '-', got {cfg.run_name!r}")
        if len(cfg.channels) < 2 or min(cfg.channels) < 1:
            raise ValueError(f"run config 'channels': expected at least two positive integers, got {raw['channels']!r}")
        if sites and cfg.min_sites > len(sites):
            raise ValueError(f"run config 'min-sites' = {cfg.min_sites} exceeds the {len(sites)} sites in 'sites'")
        try:  # the model and data factories check the rest (roi >= 8, groups divide channels, ...)
            cfg.model_config()
            cfg.data_config()
        except ValueError as exc:
            raise ValueError(f"run config: {exc}") from None
        return cfg

    def model_config(self) -> ModelConfig:
        return ModelConfig(norm=self.norm, channels=self.channels, strides=(2,) * (len(self.channels) - 1), groups=self.groups)

    def data_config(self) -> DataConfig:
        return DataConfig(spacing=self.spacing, roi_size=self.roi_size, batch_size=self.batch_size,
                          samples_per_volume=self.samples_per_volume, zscore=self.zscore)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Back to Flower's flat kebab-case dict (tuples as comma-separated strings)."""
        out: dict[str, bool | int | float | str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, tuple) else value
        return out

    def fault_for(self, site: str) -> str | None:
        """The fault this site must inject (``"nan"``, ``"inf"``, ``"shape"``), if any."""
        if not self.fault_inject:
            return None
        target, kind = self.fault_inject.rsplit(":", 1)
        return kind if target == site else None


def split_norm_state(state: Mapping, norm_keys: set[str]) -> tuple[dict, dict]:
    """Split a state dict into (shared, normalisation) parts; FedBN keeps the second local."""
    shared = {k: v for k, v in state.items() if k not in norm_keys}
    local = {k: v for k, v in state.items() if k in norm_keys}
    return shared, local
