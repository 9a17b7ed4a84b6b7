"""fedmri's site task: train and evaluate the global model at one hospital, on its own data.

Flower's app template: ``client/app.py`` is the thin ClientApp, this module the work. Each function takes the
message's content (a ``RecordDict``) and the node's ``Context`` and returns the reply's content; the node's
``context.state`` (FedBN local layers, the OOD reference) is updated in place. The ClientApp calls these in its
own process in a simulation (a warm Ray actor), and hands them to the site's warm worker process
(``client/worker.py``) in a deployment, where Flower starts a fresh ClientApp process per message.

The site comes from the SuperNode's node config (``site="hospital-a" data-dir="/abs/path"``) in
a deployment, or from ``sites[partition-id]`` under the run config's ``data-dir`` in simulation.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from client import timing
from shared.cache import DEFAULT_CACHE_NAME, SiteCache, use_site_cache
from shared.data import DataConfig, make_train_loader, reseed_loader, sampling_seed
from shared.errors import InvalidSiteError
from shared.inferer import resolve_device
from shared.model import build_unet, norm_parameter_names, split_norm_state
from shared.runconfig import RunConfig
from shared.site_state import load_local_state, local_state_path, save_local_state
from shared.training import evaluate, load_site, planned_steps, train_epochs

__all__ = ["train", "evaluate_global", "LOCAL_NORM_KEY", "OOD_KEY", "EARLY_EVAL_PREFIX"]

timing.imports_done()
log = logging.getLogger(__name__)

LOCAL_NORM_KEY = "fedbn-local-norm"
OOD_KEY = "ood-reference"  # the reply's record with the site's intensity summary (``shared.ood``)
EARLY_EVAL_PREFIX = "eval/"  # as server.federation.strategy.EARLY_EVAL_PREFIX (not imported: server code)


def _site_of(context: Context, cfg: RunConfig) -> tuple[str, Path]:
    """This node's site name and data folder."""
    node = context.node_config
    if "data-dir" in node:
        data_dir = Path(str(node["data-dir"]))
        return str(node.get("site", data_dir.name)), data_dir
    if "partition-id" not in node:
        raise InvalidSiteError("node config has neither data-dir (deployment) nor partition-id (simulation)")
    pid, n = int(node["partition-id"]), int(node.get("num-partitions", 0))
    if not cfg.data_dir or not cfg.sites:
        raise InvalidSiteError("simulation needs run config 'data-dir' and 'sites'")
    if n != len(cfg.sites):
        raise InvalidSiteError(f"{n} virtual nodes but {len(cfg.sites)} sites in run config 'sites'")
    return cfg.sites[pid], Path(cfg.data_dir) / cfg.sites[pid]


def _site_files(data_dir: Path) -> tuple:
    """Name, size and modification time of every file of the site: a warm process (simulation actor, site worker)
    that outlives a run must not reuse a loader after the site's files changed."""
    out = []
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        try:
            entries = sorted(os.scandir(data_dir / sub), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat()
            except OSError:
                continue
            out.append((sub, entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


@lru_cache(maxsize=4)
def _site_data(data_dir: str, data_cfg: tuple, seed: int, cache_root: str = "", files: tuple = ()):
    """Validated split and a cached loader; reused while a simulation actor or site worker serves the same site
    (``files``: the site's files as :func:`_site_files` sees them, so a changed file builds anew). Preprocessed
    volumes come from the site's disk cache when ``cache_root`` is set (a fresh process, a new worker)."""
    cfg = DataConfig(**dict(data_cfg))
    split = load_site(data_dir, cfg, seed=seed)
    with use_site_cache(_cache_at(cache_root)):
        return split, make_train_loader(split.train, cfg, seed=seed)


_CACHES: dict[str, SiteCache] = {}


def _cache_at(root: str) -> SiteCache | None:
    """One SiteCache per folder and process (its ``stats`` count this process's hits and builds)."""
    if root and root not in _CACHES:
        _CACHES[root] = SiteCache(root)
    return _CACHES.get(root) if root else None


def _cache_root(context: Context, data_dir: Path, enabled: bool) -> str:
    """The site's own cache folder: node config ``cache-dir``, else ``<data-dir>/.fedmri-cache``; "" when the
    run config turns it off (``site-cache = false``) or the folder is not writable (e.g. a read-only data mount)."""
    if not enabled or not Path(data_dir).is_dir():
        return ""  # (a missing site folder is reported by the loader, and nothing is created for it)
    root = str(context.node_config.get("cache-dir", "") or Path(data_dir) / DEFAULT_CACHE_NAME)
    if not SiteCache(root).usable():
        log.warning("site cache %s is not writable: preprocessing every message (set node config cache-dir)", root)
        return ""
    return root


def _flag(value) -> bool:
    return value.lower() == "true" if isinstance(value, str) else bool(value)


def _set_threads(context: Context) -> None:
    """torch threads from this site's CPU budget (node config ``cpus``); untouched when it is not given."""
    cpus = int(context.node_config.get("cpus", 0) or 0)
    if cpus > 0 and torch.get_num_threads() != cpus:
        torch.set_num_threads(cpus)
        try:
            torch.set_num_interop_threads(cpus)
        except RuntimeError:  # only possible before the first parallel op; a reused actor has run one
            pass


def _cache_counts() -> dict[str, int]:
    """Site-cache reads and builds so far in this process."""
    return {k: sum(c.stats[k] for c in _CACHES.values()) for k in ("hits", "built")}


@contextmanager
def _named(site: str):
    """Prefix any failure with the site name: the reason travels to the server log and run log."""
    try:
        yield
    except Exception as exc:
        raise (
            type(exc)(f"site {site}: {exc}")
            if isinstance(exc, (InvalidSiteError, ValueError))
            else RuntimeError(f"site {site}: {type(exc).__name__}: {exc}")
        ) from None


def _load(context: Context, content: RecordDict):
    _set_threads(context)
    cfg = RunConfig.from_run_config(context.run_config)
    site, data_dir = _site_of(context, cfg)
    data_cfg = cfg.data_config()
    cache_root = _cache_root(context, data_dir, cfg.site_cache)
    with _named(site):
        split, loader = _site_data(
            str(data_dir),
            tuple(sorted((k, v) for k, v in vars(data_cfg).items())),
            cfg.seed,
            cache_root,
            _site_files(data_dir),
        )
    torch.manual_seed(cfg.seed)  # same initial norm layers at every site
    model = build_unet(cfg.network_config())
    if cfg.fedbn and LOCAL_NORM_KEY not in context.state:
        _restore_local(context, cfg, data_dir, content)
    with _named(site):
        _apply_global(model, content["arrays"].to_torch_state_dict(), context, cfg)
    return cfg, site, split, loader, model, cache_root


def _round(content: RecordDict) -> int:
    config = content["config"]
    return int(config.get("global-round", config.get("server-round", 1)))


def _restore_local(context: Context, cfg: RunConfig, data_dir: Path, content: RecordDict) -> None:
    """FedBN after a restart or ``resume``: the local layers this site saved on its own disk (shared.site_state)."""
    round_ = _round(content)
    saved = load_local_state(local_state_path(data_dir, cfg.run_name, context.node_config))
    if saved is not None and (cfg.resume or round_ > 1):
        context.state[LOCAL_NORM_KEY] = ArrayRecord(torch_state_dict=saved[1])


def _apply_global(model: torch.nn.Module, state: dict, context: Context, cfg: RunConfig) -> None:
    """Load the global weights; under FedBN the site's own normalisation layers are put back."""
    norm_keys = norm_parameter_names(model)
    if cfg.fedbn and LOCAL_NORM_KEY in context.state:
        state = {**state, **context.state[LOCAL_NORM_KEY].to_torch_state_dict()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # FedBN's first round may lack norm keys (nothing local yet); anything else is a mismatch.
    if unexpected or (set(missing) - (norm_keys if cfg.fedbn else set())):
        raise ValueError(
            f"global model does not match this network: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )


def _corrupt(state: dict, kind: str) -> dict:
    """Fault drill: a NaN, Inf or wrongly shaped update (run config ``fault-inject``)."""
    key = next(k for k, v in state.items() if v.is_floating_point())
    bad = state[key].clone()
    if kind == "shape":
        bad = torch.zeros(bad.numel() + 1)
    else:
        bad.view(-1)[0] = float("nan") if kind == "nan" else float("inf")
    return {**state, key: bad}


def train(content: RecordDict, context: Context) -> RecordDict:
    """Train the received global model on this site's training cases.

    With ``evaluate-first`` in the message config (eval-with-train), the received model is evaluated
    on the validation cases before training and the metrics come back with ``eval/`` prefixes.
    """
    watch, counts = timing.Stopwatch(), _cache_counts()
    cfg, site, split, loader, model, cache_root = _load(context, content)
    watch.lap("data")
    early = {}
    if _flag(content["config"].get("evaluate-first", False)):
        early = {f"{EARLY_EVAL_PREFIX}{k}": v for k, v in _evaluate(cfg, site, split, model, cache_root).items()}
        watch.lap("eval")
    round_ = _round(content)
    torch.manual_seed(cfg.seed * 1000 + round_)
    reseed_loader(loader, sampling_seed(cfg.seed, site, round_))  # new crops every round, in both modes
    if cfg.augment:  # non-linear intensity augmentation (shared.augment), its own stream per round
        from shared.augment import AugmentedLoader

        loader = AugmentedLoader(loader, seed=sampling_seed(cfg.seed, site, round_) + 1)
    per_round = planned_steps(loader, cfg.local_epochs, cfg.max_steps or None)
    with _named(site):
        stats = train_epochs(
            model,
            loader,
            epochs=cfg.local_epochs,
            lr=cfg.lr,
            device=resolve_device(cfg.device),
            proximal_mu=float(content["config"].get("proximal-mu", 0.0)),
            max_steps=cfg.max_steps or None,
            lr_schedule=cfg.lr_schedule,
            class_weights=cfg.class_weights,  # the schedule spans all rounds
            step_offset=(round_ - 1) * per_round,
            total_steps=cfg.num_server_rounds * per_round,
        )
    watch.lap("train")
    state = model.state_dict()
    if cfg.fedbn:
        _, local = split_norm_state(state, norm_parameter_names(model))
        context.state[LOCAL_NORM_KEY] = ArrayRecord(torch_state_dict=local)
        save_local_state(
            local_state_path(_site_of(context, cfg)[1], cfg.run_name, context.node_config), local, round_, cfg.run_name
        )  # on this site's disk, never sent
    fault = cfg.fault_for(site)
    if fault:
        state = _corrupt(state, fault)
    metrics = MetricRecord(
        {
            "train_loss": stats["train_loss"],
            "first_loss": stats["first_loss"],
            "steps": int(stats["steps"]),
            "seconds": stats["seconds"],
            "lr_last": stats["lr_last"],
            "crop_fingerprint": stats["crop_fingerprint"],
            "num-examples": len(split.train),
            **early,
        }
    )
    arrays = ArrayRecord(torch_state_dict=state)
    watch.lap("serialize")
    metrics.update({**_cache_delta(counts), "threads": torch.get_num_threads(), **watch.metrics()})
    return RecordDict(
        {
            "arrays": arrays,
            "metrics": metrics,
            "site": ConfigRecord({"name": site}),
            OOD_KEY: _ood_reference(context, split),
        }
    )


def _ood_reference(context: Context, split) -> ConfigRecord:
    """This site's aggregate, affine-invariant intensity summary of its training volumes (``shared.ood``: counts,
    means and spreads, never an image or one volume's features), computed once per run and kept in the node's
    state; the server stores it with the model so the API can warn about scans unlike any site's."""
    if OOD_KEY not in context.state:
        from shared.io import load_volume
        from shared.ood import site_metrics, site_reference

        reference = site_reference(load_volume(case["image"])[0] for case in split.train)
        context.state[OOD_KEY] = ConfigRecord(site_metrics(reference))
    return context.state[OOD_KEY]


def evaluate_global(content: RecordDict, context: Context) -> RecordDict:
    """Per-label Dice (and HD95 when configured) of the global model on this site's validation cases."""
    watch, counts = timing.Stopwatch(), _cache_counts()
    cfg, site, split, _, model, cache_root = _load(context, content)
    watch.lap("data")
    metrics = _evaluate(cfg, site, split, model, cache_root)
    watch.lap("eval")
    metrics.update({**_cache_delta(counts), **watch.metrics()})
    return RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site})})


def _evaluate(cfg: RunConfig, site: str, split, model: torch.nn.Module, cache_root: str) -> dict:
    """Dice (HD95) of ``model`` on the site's validation cases (its training cases if it has no other)."""
    cases, on_train = (split.val, 0) if split.val else (split.train, 1)  # one-case sites: no held-out case
    with _named(site), use_site_cache(_cache_at(cache_root)):
        result = evaluate(model, cases, cfg.data_config(), hd95=cfg.hd95)
    metrics = {k: (v if np.isfinite(v) else float("nan")) for k, v in result.flat().items()}
    metrics.update({"eval_on_train": on_train, "num-examples": len(cases)})
    return metrics


def _cache_delta(before: dict[str, int]) -> dict[str, int]:
    """This message's site-cache reads and builds (the volumes a fresh process found ready, or had to make)."""
    after = _cache_counts()
    return {"cache_hits": after["hits"] - before["hits"], "cache_built": after["built"] - before["built"]}
