"""The normalisation ablation: same data, rounds and budget, different ways to handle site shifts.

Variants (``VARIANTS``), each a set of run-config overrides on one base ``RunConfig``:

- ``fed-in``        federated instance norm, FedAvg (the product)
- ``fed-bn``        federated BatchNorm, FedAvg (running stats are averaged across sites)
- ``fedbn``         BatchNorm with local norm layers (FedBN)
- ``fed-gn``        federated GroupNorm, FedAvg
- ``fed-bn-zscore`` federated BatchNorm on z-scored inputs, FedAvg
- ``pooled-in``     instance norm trained centrally on the pooled sites (the upper baseline)
- ``local-in``      one instance-norm model per site, trained on that site alone; evaluated on
                    every site (the cross-site matrix)

Budget: federated runs train ``num-server-rounds`` x ``local-epochs`` epochs at every site; the
pooled and local models train that many epochs over their data, i.e. the same number of passes
over every training case. Federated runs go through ``server.federation.run_federation`` (real
Flower simulation); every model is then evaluated on every site's held-out test cases by
``server.report.evaluation`` with the affine invariance check. ``server.report.ablation`` renders
the results.

FedBN caveat: its checkpoint holds the *averaged* norm layers, i.e. the model a new hospital would
receive. The per-site local-norm performance is the federated validation Dice of the last round,
reported next to it (``fed_val`` columns).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.report.ablation import write_ablation
from server.report.evaluation import SiteEvaluation, evaluate_sites
from server.report.fairness import summarize_sites
from server.report.history import read_history
from server.report.invariance import summarize_checks
from server.report.render import fmt
from shared.data import DataConfig
from shared.labels import TISSUE_LABELS
from shared.metrics import nanmean
from shared.runconfig import RunConfig

__all__ = ["VARIANTS", "FAST", "FULL", "AblationConfig", "run_ablation"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    title: str
    kind: str  # "federated", "pooled" or "local"
    overrides: dict = field(default_factory=dict)  # run-config keys this variant changes


VARIANTS: dict[str, Variant] = {
    "fed-in": Variant("federated IN (FedAvg)", "federated", {"norm": "instance"}),
    "fed-bn": Variant("federated BN (FedAvg)", "federated", {"norm": "batch"}),
    "fedbn": Variant("BN, local norm layers (FedBN)", "federated", {"norm": "batch", "fedbn": True}),
    "fed-gn": Variant("federated GroupNorm (FedAvg)", "federated", {"norm": "group"}),
    "fed-bn-zscore": Variant("federated BN + input z-score", "federated", {"norm": "batch", "zscore": True}),
    "pooled-in": Variant("pooled centralized IN", "pooled", {"norm": "instance"}),
    "local-in": Variant("local-only IN (own site)", "local", {"norm": "instance"}),
}

# Presets: run-config overrides shared by every variant. FAST: about 20 minutes on 2 CPU cores.
FAST: dict = {"num-server-rounds": 8, "local-epochs": 2, "spacing": "3,3,3", "roi-size": "48,48,48", "lr": 0.003}
FULL: dict = {
    "num-server-rounds": 20,
    "local-epochs": 2,
    "spacing": "2,2,2",
    "roi-size": "64,64,64",
    "channels": "16,32,64,128",
    "lr": 0.001,
}


@dataclass
class AblationConfig:
    """What the ablation runs: one base run config, the variants as overrides of it, the evaluation.

    Args:
        run: the base run config every variant starts from (default: the ``FAST`` preset).
        k: random affine maps per test volume for the invariance score.
        threshold: fairness threshold on mean Dice.
        sites: site names (default: all under the data folder).
        variants: which of ``VARIANTS`` to run.
    """

    run: RunConfig = field(default_factory=lambda: RunConfig.from_run_config(FAST))
    k: int = 2
    threshold: float = 0.7
    sites: list[str] | None = None
    variants: tuple[str, ...] = tuple(VARIANTS)

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown ablation variant(s) {unknown}; choose from {list(VARIANTS)}")

    @classmethod
    def preset(cls, full: bool = False, run_config: Mapping | None = None, **study) -> AblationConfig:
        """The fast (default) or full preset, with run-config overrides on top."""
        run = RunConfig.from_run_config({**(FULL if full else FAST), **dict(run_config or {})})
        return cls(run=run, **{"k": 5 if full else 2, **study})

    def variant_config(self, variant: Variant) -> RunConfig:
        return self.run.replace(**variant.overrides)

    def to_dict(self) -> dict:
        return {
            "run": self.run.to_run_config(),
            "k": self.k,
            "threshold": self.threshold,
            "sites": self.sites,
            "variants": list(self.variants),
        }


def _evaluate(model, cfg: DataConfig, data_dir, config: AblationConfig) -> tuple[list[SiteEvaluation], list[dict]]:
    return evaluate_sites(
        model,
        data_dir,
        cfg,
        sites=config.sites,
        k=config.k,
        gammas=(),
        bias_strengths=(),
        seed=config.run.seed,
        hd95=False,
    )


def _site_scores(evaluations: Sequence[SiteEvaluation]) -> dict[str, dict]:
    """Per site: mean foreground Dice, per-label Dice and affine agreement."""
    out = {}
    for e in evaluations:
        labels = sorted({k for c in e.cases for k in c["dice"]})
        per_label = {k: nanmean(c["dice"][k] for c in e.cases) for k in labels}
        case_means = [nanmean(c["dice"].values()) for c in e.cases]
        tissue = [nanmean(c["dice"].get(k, math.nan) for k in TISSUE_LABELS) for c in e.cases]
        inv = summarize_checks(e.affine_checks)
        out[e.site] = {
            "dice": nanmean(case_means),
            "tissue_dice": nanmean(tissue),
            "dice_per_label": per_label,
            "n_cases": len(e.cases),
            "invariance_mean": inv["mean"],
            "invariance_min": inv["min"],
        }
    return out


def _summary(name: str, variant: Variant, sites: dict[str, dict], config: AblationConfig, **extra) -> dict:
    fairness = summarize_sites({s: v["dice"] for s, v in sites.items()}, config.threshold)
    tissue = summarize_sites({s: v["tissue_dice"] for s, v in sites.items()}, config.threshold)
    inv_means = [v["invariance_mean"] for v in sites.values()]
    inv_mins = [v["invariance_min"] for v in sites.values()]
    return {
        "name": name,
        "title": variant.title,
        "kind": variant.kind,
        "sites": sites,
        "mean_dice": fairness.mean,
        "worst_site": fairness.worst_site,
        "worst_dice": fairness.worst,
        "gap": fairness.gap,
        "ratio": fairness.ratio,
        "std": fairness.std,
        "flagged": fairness.flagged,
        "tissue": {
            "mean": tissue.mean,
            "worst_site": tissue.worst_site,
            "worst": tissue.worst,
            "gap": tissue.gap,
            "ratio": tissue.ratio,
            "std": tissue.std,
            "flagged": tissue.flagged,
        },
        "invariance": nanmean(inv_means),
        "invariance_min": float(np.nanmin(inv_mins)) if np.isfinite(inv_mins).any() else math.nan,
        **extra,
    }


def _train_central(sites, cfg: RunConfig, epochs: int):
    import torch

    from shared.model import build_unet
    from shared.training import train_on_sites

    torch.manual_seed(cfg.seed)
    model = build_unet(cfg.network_config())
    history = train_on_sites(sites, model, cfg.data_config(), epochs, lr=cfg.lr, seed=cfg.seed)
    return model.eval(), history


def _federate(
    run_federation,
    data_dir,
    runs: Path,
    config: AblationConfig,
    variant: Variant,
    run_name: str,
    mode: str,
    echo: Callable[[str], None],
    attempts: int = 2,
):
    """One federated variant; a run that did not complete is retried once from scratch."""
    from server.federation import FederationError

    for attempt in range(1, attempts + 1):
        try:
            return run_federation(
                data_dir,
                runs,
                sites=config.sites,
                run_config=config.variant_config(variant).to_run_config(),
                run_name=run_name,
                mode=mode,
            )
        except FederationError as exc:
            if attempt == attempts:
                raise
            echo(f"  {run_name}: federation did not complete, retrying ({str(exc).splitlines()[0][:200]})")


def run_ablation(
    data_dir: str | Path,
    out_dir: str | Path,
    config: AblationConfig | None = None,
    echo: Callable[[str], None] = print,
    mode: str = "simulation",
) -> dict:
    """Train and evaluate every variant of ``config.variants``; write ablation.{html,json,csv,md}.

    Models go to ``out_dir/runs/registry`` (federation run logs to ``out_dir/runs/federation``).
    Returns the results dict that ablation.json holds.
    """
    from server.federation import run_federation
    from shared.registry import data_config_from_meta, load_model, save_model
    from shared.training import discover_sites, load_site

    config = config or AblationConfig()
    out = Path(out_dir)
    runs = out / "runs"
    registry = runs / "registry"
    site_dirs = discover_sites(data_dir, config.sites)
    epochs = config.run.num_server_rounds * config.run.local_epochs
    results: dict = {
        "config": config.to_dict(),
        "data_dir": str(data_dir),
        "budget_epochs": epochs,
        "variants": [],
        "cross_site": None,
        "cross_site_tissue": None,
        "skipped": {},
    }
    start_all = time.perf_counter()
    for name in config.variants:
        variant = VARIANTS[name]
        start = time.perf_counter()
        echo(f"[ablation] {name}: {variant.title} ...")
        if variant.kind == "federated":
            fed = _federate(run_federation, data_dir, runs, config, variant, f"ablation-{name}", mode, echo)
            train_seconds = time.perf_counter() - start
            model, meta = load_model(registry, fed.version)
            evaluations, skipped = _evaluate(model, data_config_from_meta(meta), data_dir, config)
            history = read_history(fed.log_path)
            last_val = {s: v[-1] for s, v in history.sites.items()} if history.rounds else {}
            summary = _summary(
                name,
                variant,
                _site_scores(evaluations),
                config,
                version=fed.version,
                fed_val_last_round=last_val,
                history=history.to_dict(),
                train_seconds=train_seconds,
            )
        elif variant.kind == "pooled":
            cfg = config.variant_config(variant)
            dcfg = cfg.data_config()
            sites = [load_site(p, dcfg, seed=cfg.seed) for p in site_dirs]
            model, hist = _train_central(sites, cfg, epochs)
            save_model(
                registry,
                "ablation-pooled-in",
                model.state_dict(),
                cfg.network_config(),
                dcfg,
                kind="pooled",
                strategy="centralized",
                norm=cfg.norm,
                sites=[s.name for s in sites],
                epochs=epochs,
                history=hist,
                config=cfg.to_run_config(),
            )
            train_seconds = time.perf_counter() - start
            evaluations, skipped = _evaluate(model, dcfg, data_dir, config)
            summary = _summary(
                name,
                variant,
                _site_scores(evaluations),
                config,
                version="ablation-pooled-in",
                train_seconds=train_seconds,
            )
        else:  # local-only: one model per site, every model on every site
            cfg = config.variant_config(variant)
            dcfg = cfg.data_config()
            matrix: dict[str, dict[str, float]] = {}
            matrix_tissue: dict[str, dict[str, float]] = {}
            own: dict[str, dict] = {}
            train_seconds, skipped = 0.0, []
            for site_dir in site_dirs:
                site = load_site(site_dir, dcfg, seed=cfg.seed)
                t0 = time.perf_counter()
                model, hist = _train_central([site], cfg, epochs)
                train_seconds += time.perf_counter() - t0
                save_model(
                    registry,
                    f"ablation-local-{site.name}",
                    model.state_dict(),
                    cfg.network_config(),
                    dcfg,
                    kind="local",
                    strategy="centralized",
                    norm=cfg.norm,
                    sites=[site.name],
                    epochs=epochs,
                    history=hist,
                    config=cfg.to_run_config(),
                )
                evaluations, skipped = _evaluate(model, dcfg, data_dir, config)
                scores = _site_scores(evaluations)
                matrix[site.name] = {s: v["dice"] for s, v in scores.items()}
                matrix_tissue[site.name] = {s: v["tissue_dice"] for s, v in scores.items()}
                if site.name in scores:
                    own[site.name] = scores[site.name]
                echo(f"  local {site.name}: " + "  ".join(f"{s} {fmt(v)}" for s, v in matrix[site.name].items()))
            results["cross_site"] = matrix
            results["cross_site_tissue"] = matrix_tissue
            summary = _summary(name, variant, own, config, train_seconds=train_seconds)
        summary["seconds"] = time.perf_counter() - start
        if skipped:
            results["skipped"][name] = skipped
        results["variants"].append(summary)
        echo(
            f"[ablation] {name}: mean Dice {fmt(summary['mean_dice'])}, worst {summary['worst_site']} "
            f"{fmt(summary['worst_dice'])}, gap {fmt(summary['gap'])}, invariance {fmt(summary['invariance'], 4)} "
            f"({summary['seconds']:.0f}s)"
        )
        write_ablation(results, out, time.perf_counter() - start_all)  # partial results survive an interrupted run
    results["seconds"] = time.perf_counter() - start_all
    write_ablation(results, out, results["seconds"])
    return results
