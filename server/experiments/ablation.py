"""The harmonization study: same data, rounds and budget, different ways to handle site shifts, over seeds.

Data: the study hospitals (``fedmri generate --preset study``, ``shared.synth.STUDY_SITES``), each
differing from a clean reference scanner in one factor (affine extremes, gamma, bias field, thick
slices, low SNR, few cases) plus one combining the non-affine factors.

Variants (``VARIANTS``), each a set of run-config overrides on one base ``RunConfig``:

- ``fed-in``             federated instance norm, FedAvg (the product)
- ``fed-in-fedbn``       instance norm with learnable per-channel gamma, beta kept at each site (FedBN):
                         site-conditional IN; two rows: *personalised* and *new site*
- ``fed-bn``             federated BatchNorm, FedAvg
- ``fedbn``              BatchNorm with local norm layers (FedBN); two rows as above
- ``fed-in-aug``         IN + non-linear intensity augmentation (run config ``augment``)
- ``fed-in-nyul``        IN on Nyúl-standardised inputs (``server.experiments.harmonize``)
- ``fed-in-whitestripe`` IN on WhiteStripe-normalised inputs
- ``fed-gn``, ``fed-bn-zscore``, ``fed-bn-nyul`` (not in the fast default)
- ``pooled-in``          instance norm trained centrally on the pooled sites (the upper baseline)
- ``local-in``           one IN model per site on its own data; the first seed's models are evaluated
                         on every site (the cross-site matrix)

FedBN is evaluated two ways: *personalised* — the global checkpoint with each site's own local
layers, read from that site's disk (``shared.site_state``), on that site's test cases; *new site* —
the checkpoint's averaged layers, what a hospital outside the federation would receive.

Every variant runs for every seed of ``AblationConfig.seeds`` (the seed changes initialisation,
splits and sampling). Per case, Dice is averaged over seeds; paired per-case differences with
bootstrap 95 % CIs (``server.experiments.stats``) compare IN with BN, pooled and local-only at
each site, and every comparing sentence of the outputs is generated from them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.experiments.stats import claim, mean_sd, paired_difference
from server.report.ablation import write_ablation
from server.report.evaluation import SiteEvaluation, evaluate_sites
from server.report.fairness import summarize_sites
from server.report.invariance import summarize_checks
from server.report.render import fmt
from shared.data import DataConfig
from shared.labels import TISSUE_LABELS
from shared.metrics import nanmean
from shared.runconfig import RunConfig

__all__ = [
    "VARIANTS",
    "DEFAULT_VARIANTS",
    "COMPARISONS",
    "FAST",
    "FULL",
    "DEFAULT_SEEDS",
    "AblationConfig",
    "run_ablation",
    "analyse",
    "merge_results",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    title: str
    kind: str  # "federated", "pooled" or "local"
    overrides: dict = field(default_factory=dict)  # run-config keys this variant changes
    harmonize: str = ""  # input harmonization (server.experiments.harmonize) before training and evaluation


VARIANTS: dict[str, Variant] = {
    "fed-in": Variant("federated IN (FedAvg)", "federated", {"norm": "instance"}),
    "fed-in-fedbn": Variant(
        "site-conditional IN (affine IN, FedBN)", "federated", {"norm": "instance", "norm-affine": True, "fedbn": True}
    ),
    "fed-bn": Variant("federated BN (FedAvg)", "federated", {"norm": "batch"}),
    "fedbn": Variant("BN, local norm layers (FedBN)", "federated", {"norm": "batch", "fedbn": True}),
    "fed-in-aug": Variant("IN + non-linear augmentation", "federated", {"norm": "instance", "augment": True}),
    "fed-in-nyul": Variant("IN + Nyúl histogram standardisation", "federated", {"norm": "instance"}, "nyul"),
    "fed-in-whitestripe": Variant("IN + WhiteStripe", "federated", {"norm": "instance"}, "whitestripe"),
    "fed-gn": Variant("federated GroupNorm (FedAvg)", "federated", {"norm": "group"}),
    "fed-bn-zscore": Variant("federated BN + input z-score", "federated", {"norm": "batch", "zscore": True}),
    "fed-bn-nyul": Variant("BN + Nyúl histogram standardisation", "federated", {"norm": "batch"}, "nyul"),
    "pooled-in": Variant("pooled centralized IN", "pooled", {"norm": "instance"}),
    "local-in": Variant("local-only IN (own site)", "local", {"norm": "instance"}),
}
DEFAULT_VARIANTS: tuple[str, ...] = (
    "fed-in",
    "fed-in-fedbn",
    "fed-bn",
    "fedbn",
    "fed-in-aug",
    "fed-in-nyul",
    "fed-in-whitestripe",
    "pooled-in",
    "local-in",
)
# The paired comparisons the study reports at every site: (label, row compared with fed-in).
COMPARISONS: tuple[tuple[str, str], ...] = (("IN − BN", "fed-bn"), ("IN − pooled", "pooled-in"),
                                            ("IN − local-only", "local-in"))
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)

# Presets: run-config overrides shared by every variant. FAST: 3 mm, small crops, few rounds (2 cores).
# Every site does exactly ``max-steps`` optimiser steps a round (``local-epochs`` is only an upper bound): a
# 4-case site's epoch is 2 steps, so epochs alone left the fast models untrained (tissue Dice ~0.5).
FAST: dict = {"num-server-rounds": 3, "local-epochs": 100, "max-steps": 40, "spacing": "3,3,3",
              "roi-size": "32,32,32", "lr": 0.01, "channels": "8,16,32"}
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
    """What the ablation runs: one base run config, the variants as overrides of it, seeds, the evaluation.

    Args:
        run: the base run config every variant starts from (default: the ``FAST`` preset).
        k: random affine maps per test volume for the invariance score (first seed only).
        threshold: fairness threshold on mean Dice.
        sites: site names (default: all under the data folder).
        variants: which of ``VARIANTS`` to run.
        seeds: run-config seeds; every variant runs once per seed.
        bootstrap: bootstrap resamples for the paired CIs.
        cross_site: evaluate the first seed's local-only models on every site (the cross-site matrix).
    """

    run: RunConfig = field(default_factory=lambda: RunConfig.from_run_config(FAST))
    k: int = 2
    threshold: float = 0.7
    sites: list[str] | None = None
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    bootstrap: int = 5000
    cross_site: bool = True

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown ablation variant(s) {unknown}; choose from {list(VARIANTS)}")
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative integers, got {self.seeds}")

    @classmethod
    def preset(cls, full: bool = False, run_config: Mapping | None = None, **study) -> AblationConfig:
        """The fast (default) or full preset, with run-config overrides on top."""
        run = RunConfig.from_run_config({**(FULL if full else FAST), **dict(run_config or {})})
        return cls(run=run, **{"k": 5 if full else 2, **study})

    def variant_config(self, variant: Variant, seed: int | None = None) -> RunConfig:
        seed_change = {} if seed is None else {"seed": seed}
        return self.run.replace(**variant.overrides, **seed_change)

    def to_dict(self) -> dict:
        return {
            "run": self.run.to_run_config(),
            "k": self.k,
            "threshold": self.threshold,
            "sites": self.sites,
            "variants": list(self.variants),
            "seeds": list(self.seeds),
            "bootstrap": self.bootstrap,
            "cross_site": self.cross_site,
        }


# --------------------------------------------------------------------------------------------- evaluation


def _evaluate(model, cfg: DataConfig, data_dir, sites, k: int, seed: int) -> tuple[list[SiteEvaluation], list]:
    return evaluate_sites(
        model, data_dir, cfg, sites=sites, k=k, gammas=(), bias_strengths=(), seed=seed, hd95=False
    )


def _site_scores(evaluations: Sequence[SiteEvaluation]) -> dict[str, dict]:
    """Per site: per-case and mean foreground Dice, tissue Dice, per-label Dice and affine agreement."""
    out = {}
    for e in evaluations:
        labels = sorted({k for c in e.cases for k in c["dice"]})
        per_label = {k: nanmean(c["dice"][k] for c in e.cases) for k in labels}
        cases = {c["name"]: nanmean(c["dice"].values()) for c in e.cases}
        tissue = {c["name"]: nanmean(c["dice"].get(k, math.nan) for k in TISSUE_LABELS) for c in e.cases}
        inv = summarize_checks(e.affine_checks)
        out[e.site] = {
            "dice": nanmean(cases.values()),
            "tissue_dice": nanmean(tissue.values()),
            "dice_per_label": per_label,
            "n_cases": len(e.cases),
            "cases": cases,
            "tissue_cases": tissue,
            "invariance_mean": inv["mean"],
            "invariance_min": inv["min"],
        }
    return out


def _personalised_scores(registry: Path, version: str, data_dir: Path, sites: Sequence[str], run_name: str,
                         k: int, seed: int) -> tuple[dict[str, dict], dict[str, int]]:
    """FedBN personalised: each site's own local layers (from its disk) on top of the checkpoint, its own tests."""
    from shared.registry import data_config_from_meta, load_model
    from shared.site_state import load_local_state, local_state_path

    scores, rounds = {}, {}
    for site in sites:
        model, meta = load_model(registry, version)
        saved = load_local_state(local_state_path(data_dir / site, run_name))
        if saved is None:
            log.warning("%s: no local layers saved for %s; personalised row skips it", site, run_name)
            continue
        rounds[site] = saved[0]
        state = {**model.state_dict(), **saved[1]}
        model.load_state_dict(state)
        model.eval()
        evaluations, _ = _evaluate(model, data_config_from_meta(meta), data_dir, [site], k, seed)
        scores.update(_site_scores(evaluations))
    return scores, rounds


def _train_central(sites, cfg: RunConfig, epochs: int, n_sites: int = 1):
    """Pooled (``n_sites`` sites' data) or local-only training with the federation's budget: the same epochs of
    each site's data, and with ``max-steps`` set the same optimiser steps as ``n_sites`` sites do in all rounds;
    the same loss, class weights and learning-rate schedule as the federated clients."""
    import torch

    from shared.model import build_unet
    from shared.training import train_on_sites

    torch.manual_seed(cfg.seed)
    model = build_unet(cfg.network_config())
    steps = n_sites * cfg.num_server_rounds * cfg.max_steps if cfg.max_steps else None
    history = train_on_sites(sites, model, cfg.data_config(), epochs, lr=cfg.lr, seed=cfg.seed,
                             lr_schedule=cfg.lr_schedule, max_steps=steps, class_weights=cfg.class_weights)
    return model.eval(), history


def _federate(run_federation, data_dir, runs: Path, sites, cfg: RunConfig, run_name: str, mode: str,
              echo: Callable[[str], None], attempts: int = 2):
    """One federated run; a run that did not complete is retried once from scratch."""
    from server.federation import FederationError

    for attempt in range(1, attempts + 1):
        try:
            return run_federation(data_dir, runs, sites=sites, run_config=cfg.to_run_config(), run_name=run_name,
                                  mode=mode)
        except FederationError as exc:
            if attempt == attempts:
                raise
            echo(f"  {run_name}: federation did not complete, retrying ({str(exc).splitlines()[0][:200]})")


# --------------------------------------------------------------------------------------------- analysis


def _row(name: str, title: str, kind: str, evaluation: str) -> dict:
    return {"name": name, "title": title, "kind": kind, "evaluation": evaluation, "seeds": {}, "sites": {}}


def _summarise_row(row: dict, seeds: Sequence[int], threshold: float) -> dict:
    """Per site: mean ± sd over seeds, per-case Dice averaged over seeds; fairness of the seed means."""
    sites = sorted({s for per_seed in row["seeds"].values() for s in per_seed})
    out = {}
    for site in sites:
        per_seed = [row["seeds"].get(str(seed), {}).get(site) for seed in seeds]
        present = [p for p in per_seed if p]
        dice, tissue = mean_sd([p["dice"] for p in present]), mean_sd([p["tissue_dice"] for p in present])
        case_names = sorted({c for p in present for c in p["cases"]})
        cases = {c: nanmean(p["cases"].get(c, math.nan) for p in present) for c in case_names}
        first = present[0]
        out[site] = {
            "dice": dice["mean"],
            "sd": dice["sd"],
            "n_seeds": dice["n"],
            "tissue_dice": tissue["mean"],
            "tissue_sd": tissue["sd"],
            "n_cases": len(cases),
            "cases": cases,
            "dice_per_label": {k: nanmean(p["dice_per_label"].get(k, math.nan) for p in present)
                               for k in first["dice_per_label"]},
            "invariance_mean": first["invariance_mean"],
            "invariance_min": first["invariance_min"],
        }
    row["sites"] = out
    fair = summarize_sites({s: v["dice"] for s, v in out.items()}, threshold)
    tissue = summarize_sites({s: v["tissue_dice"] for s, v in out.items()}, threshold)
    inv_means = [v["invariance_mean"] for v in out.values()]
    inv_mins = [v["invariance_min"] for v in out.values()]
    row.update(
        mean_dice=fair.mean, worst_site=fair.worst_site, worst_dice=fair.worst, gap=fair.gap, ratio=fair.ratio,
        std=fair.std, flagged=fair.flagged,
        tissue={"mean": tissue.mean, "worst_site": tissue.worst_site, "worst": tissue.worst, "gap": tissue.gap,
                "ratio": tissue.ratio, "std": tissue.std, "flagged": tissue.flagged},
        invariance=nanmean(inv_means),
        invariance_min=float(np.nanmin(inv_mins)) if np.isfinite(np.asarray(inv_mins, float)).any() else math.nan,
    )
    return row


def _factors(rows: Sequence[dict], seeds: Sequence[int], site_factors: Mapping[str, str | None]) -> dict:
    """Per row and factor site: Dice cost = Dice(reference site) − Dice(factor site), mean ± sd over seeds."""
    reference = next((s for s, f in site_factors.items() if f == "none"), None)
    if reference is None:
        return {}
    out = {}
    for row in rows:
        costs = {}
        for site, factor in site_factors.items():
            if site == reference or not factor:
                continue
            per_seed = []
            for seed in seeds:
                scores = row["seeds"].get(str(seed), {})
                if reference in scores and site in scores:
                    per_seed.append(scores[reference]["dice"] - scores[site]["dice"])
            if per_seed:
                costs[site] = {"factor": factor, **mean_sd(per_seed)}
        out[row["name"]] = costs
    return {"reference": reference, "costs": out}


def analyse(results: dict) -> dict:
    """Seed summaries, paired comparisons and generated claims from the per-seed, per-case scores in ``results``."""
    cfg = results["config"]
    seeds, threshold = cfg["seeds"], cfg["threshold"]
    rows = [_summarise_row(r, seeds, threshold) for r in results["variants"]]
    by_name = {r["name"]: r for r in rows}
    fed_in = by_name.get("fed-in")
    comparisons: dict[str, dict] = {}
    claims: list[str] = []
    if fed_in:
        others = [(label, name) for label, name in COMPARISONS if name in by_name]
        others += [(f"IN − {r['title']}", r["name"]) for r in rows
                   if r["name"] != "fed-in" and r["name"] not in dict(COMPARISONS).values()]
        for site in sorted(fed_in["sites"]):
            comparisons[site] = {}
            for label, name in others:
                other = by_name[name]["sites"].get(site)
                if other is None:
                    continue
                a_cases = fed_in["sites"][site]["cases"]
                common = sorted(set(a_cases) & set(other["cases"]))
                result = paired_difference([a_cases[c] for c in common], [other["cases"][c] for c in common],
                                           samples=cfg.get("bootstrap", 5000), seed=0)
                comparisons[site][label] = {"row": name, **result}
                if (label, name) in COMPARISONS:
                    claims.append(claim("federated IN", by_name[name]["title"], site, result))
    factors = _factors(rows, seeds, results.get("site_factors") or {})
    return {**results, "variants": rows, "comparisons": comparisons, "claims": claims, "factors": factors}


# --------------------------------------------------------------------------------------------- runner


def _harmonized_dir(data_dir: Path, out: Path, method: str, sites, echo) -> Path:
    from server.experiments.harmonize import harmonize_data

    target = out / "harmonized" / method
    start = time.perf_counter()
    harmonize_data(data_dir, target, method, sites)
    echo(f"  input harmonization {method}: {target} ({time.perf_counter() - start:.0f}s)")
    return target


def merge_results(parts: Sequence[dict]) -> dict:
    """One study from runs of the same config on disjoint seeds (e.g. seeds run as parallel processes)."""
    if not parts:
        raise ValueError("nothing to merge")
    base = {**parts[0], "variants": [], "timings": [], "skipped": {}}
    seeds: list[int] = []
    rows: dict[str, dict] = {}
    for part in parts:
        seeds += [s for s in part["config"]["seeds"] if s not in seeds]
        base["timings"] += part.get("timings", [])
        base["skipped"].update(part.get("skipped") or {})
        for v in part["variants"]:
            row = rows.setdefault(v["name"], {**v, "seeds": {}})
            row["seeds"].update(v["seeds"])
            if "local_state_rounds" in v:
                row.setdefault("local_state_rounds", {}).update(v["local_state_rounds"])
    base["variants"] = list(rows.values())
    base["config"] = {**parts[0]["config"], "seeds": seeds}
    base["seconds"] = max(p.get("seconds", 0.0) for p in parts)
    return analyse(base)


def run_ablation(
    data_dir: str | Path,
    out_dir: str | Path,
    config: AblationConfig | None = None,
    echo: Callable[[str], None] = print,
    mode: str = "simulation",
    note: str = "",
) -> dict:
    """Train and evaluate every variant of ``config.variants`` for every seed; write ablation.{html,json,csv,md}.

    Models go to ``out_dir/runs/registry`` (federation run logs to ``out_dir/runs/federation``).
    Returns the analysed results dict that ablation.json holds.
    """
    from server.federation import run_federation
    from server.report.history import read_history
    from shared.registry import data_config_from_meta, load_model, save_model
    from shared.synth import site_factor
    from shared.training import discover_sites, load_site

    config = config or AblationConfig()
    data_dir = Path(data_dir).resolve()
    out = Path(out_dir)
    runs = out / "runs"
    registry = runs / "registry"
    site_dirs = discover_sites(data_dir, config.sites)
    site_names = [p.name for p in site_dirs]
    epochs = config.run.num_server_rounds * config.run.local_epochs
    results: dict = {
        "config": config.to_dict(),
        "data_dir": str(data_dir),
        "budget_epochs": epochs,
        "site_factors": {p.name: site_factor(p) for p in site_dirs},
        "variants": [],
        "cross_site": None,
        "cross_site_tissue": None,
        "skipped": {},
        "timings": [],
        "note": note,
    }
    rows: dict[str, dict] = {}

    def row(name: str, title: str, kind: str, evaluation: str = "global") -> dict:
        if name not in rows:
            rows[name] = _row(name, title, kind, evaluation)
            results["variants"].append(rows[name])
        return rows[name]

    start_all = time.perf_counter()
    first_seed = config.seeds[0]
    for seed in config.seeds:
        k = config.k if seed == first_seed else 0  # the invariance check once, on the first seed's models
        for name in config.variants:
            variant = VARIANTS[name]
            cfg = config.variant_config(variant, seed)
            start = time.perf_counter()
            echo(f"[ablation] seed {seed} {name}: {variant.title} ...")
            vdata = _harmonized_dir(data_dir, out, variant.harmonize, config.sites, echo) if variant.harmonize \
                else data_dir
            if variant.kind == "federated":
                run_name = f"ablation-{name}-s{seed}"
                fed = _federate(run_federation, vdata, runs, config.sites, cfg, run_name, mode, echo)
                train_seconds = time.perf_counter() - start
                model, meta = load_model(registry, fed.version)
                evaluations, skipped = _evaluate(model, data_config_from_meta(meta), vdata, config.sites, k, seed)
                history = read_history(fed.log_path)
                if cfg.fedbn:
                    r = row(f"{name}:new-site", f"{variant.title}, new site (averaged layers)", "federated",
                            "new-site")
                    personal, saved_rounds = _personalised_scores(registry, fed.version, vdata, site_names, run_name,
                                                                  k, seed)
                    p = row(f"{name}:personalised", f"{variant.title}, personalised (own layers)", "federated",
                            "personalised")
                    p["seeds"][str(seed)] = personal
                    p.setdefault("local_state_rounds", {})[str(seed)] = saved_rounds
                else:
                    r = row(name, variant.title, "federated")
                r["seeds"][str(seed)] = _site_scores(evaluations)
                if seed == first_seed:
                    r["version"] = fed.version
                    r["history"] = history.to_dict()
                    r["fed_val_last_round"] = {s: v[-1] for s, v in history.sites.items()} if history.rounds else {}
            elif variant.kind == "pooled":
                dcfg = cfg.data_config()
                sites = [load_site(p, dcfg, seed=cfg.seed) for p in discover_sites(vdata, config.sites)]
                model, hist = _train_central(sites, cfg, epochs, n_sites=len(sites))
                version = f"ablation-{name}-s{seed}"
                save_model(registry, version, model.state_dict(), cfg.network_config(), dcfg, kind="pooled",
                           strategy="centralized", norm=cfg.norm, sites=[s.name for s in sites], epochs=epochs,
                           history=hist, config=cfg.to_run_config())
                train_seconds = time.perf_counter() - start
                evaluations, skipped = _evaluate(model, dcfg, vdata, config.sites, k, seed)
                r = row(name, variant.title, "pooled")
                r["seeds"][str(seed)] = _site_scores(evaluations)
                r.setdefault("version", version)
            else:  # local-only: one model per site; the first seed's models on every site (cross-site matrix)
                dcfg = cfg.data_config()
                r = row(name, variant.title, "local")
                own: dict[str, dict] = {}
                matrix: dict[str, dict[str, float]] = {}
                matrix_tissue: dict[str, dict[str, float]] = {}
                train_seconds, skipped = 0.0, []
                for site_dir in discover_sites(vdata, config.sites):
                    site = load_site(site_dir, dcfg, seed=cfg.seed)
                    t0 = time.perf_counter()
                    model, hist = _train_central([site], cfg, epochs)
                    train_seconds += time.perf_counter() - t0
                    save_model(registry, f"ablation-local-{site.name}-s{seed}", model.state_dict(),
                               cfg.network_config(), dcfg, kind="local", strategy="centralized", norm=cfg.norm,
                               sites=[site.name], epochs=epochs, history=hist, config=cfg.to_run_config())
                    # the cross-site matrix needs Dice only: the invariance check (k maps) on the own site
                    evaluations, skipped = _evaluate(model, dcfg, vdata, [site.name], k, seed)
                    if seed == first_seed and config.cross_site:
                        others = [s for s in (config.sites or site_names) if s != site.name]
                        more, more_skipped = _evaluate(model, dcfg, vdata, others, 0, seed)
                        order = {name: i for i, name in enumerate(site_names)}
                        evaluations = sorted(evaluations + more, key=lambda e: order.get(e.site, len(order)))
                        skipped = skipped + more_skipped
                    scores = _site_scores(evaluations)
                    matrix[site.name] = {s: v["dice"] for s, v in scores.items()}
                    matrix_tissue[site.name] = {s: v["tissue_dice"] for s, v in scores.items()}
                    if site.name in scores:
                        own[site.name] = scores[site.name]
                    echo(f"  local {site.name}: " + "  ".join(f"{s} {fmt(v)}" for s, v in matrix[site.name].items()))
                r["seeds"][str(seed)] = own
                if seed == first_seed and config.cross_site:
                    results["cross_site"], results["cross_site_tissue"] = matrix, matrix_tissue
            seconds = time.perf_counter() - start
            results["timings"].append(
                {"variant": name, "seed": seed, "seconds": seconds, "train_seconds": train_seconds}
            )
            if skipped:
                results["skipped"][f"{name}:s{seed}"] = skipped
            scores = r["seeds"][str(seed)]
            echo(f"[ablation] seed {seed} {name}: mean Dice {fmt(nanmean(v['dice'] for v in scores.values()))} "
                 f"({seconds:.0f}s)")
            write_ablation(analyse(results), out, time.perf_counter() - start_all)  # partial results survive
    results["seconds"] = time.perf_counter() - start_all
    analysed = analyse(results)
    fed_in = next((r for r in analysed["variants"] if r["name"] == "fed-in"), None)
    if fed_in and analysed.get("cross_site") is not None:  # the federated IN model's row of the matrix
        first = fed_in["seeds"].get(str(first_seed), {})
        analysed["cross_site_federated"] = {s: v["dice"] for s, v in first.items()}
        analysed["cross_site_federated_tissue"] = {s: v["tissue_dice"] for s, v in first.items()}
    write_ablation(analysed, out, analysed["seconds"])
    return analysed
