"""The normalisation ablation: same data, rounds and budget, different ways to handle site shifts.

Variants (``VARIANTS``):

- ``fed-in``        federated instance norm, FedAvg (the product)
- ``fed-bn``        federated BatchNorm, FedAvg (running stats are averaged across sites)
- ``fedbn``         BatchNorm with local norm layers (FedBN)
- ``fed-gn``        federated GroupNorm (4 groups), FedAvg
- ``fed-bn-zscore`` federated BatchNorm on z-scored inputs, FedAvg
- ``pooled-in``     instance norm trained centrally on the pooled sites (the upper baseline)
- ``local-in``      one instance-norm model per site, trained on that site alone; evaluated on
                    every site (the cross-site matrix)

Budget: federated runs train ``rounds`` x ``local_epochs`` epochs at every site; the pooled and
local models train ``rounds * local_epochs`` epochs over their data, i.e. the same number of
passes over every training case. Federated runs go through ``server.federation.run_federation``
(real Flower simulation); every model is then evaluated on every site's held-out test cases by
``server.report.evaluation`` with the affine invariance check.

FedBN caveat: its checkpoint holds the *averaged* norm layers (``server.federation``), i.e. the
model a new hospital would receive. The per-site local-norm performance is the federated
validation Dice of the last round, reported next to it (``fed_val`` columns).
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from shared.data import DataConfig
from shared.metrics import nanmean
from shared.model import ModelConfig

from server.report import figures
from server.report.build import to_jsonable, write_csv
from server.report.evaluation import SiteEvaluation, evaluate_sites
from server.report.fairness import summarize_sites
from server.report.history import read_history
from server.report.invariance import summarize_checks
from server.report.render import fmt, image, page, table

__all__ = ["VARIANTS", "AblationConfig", "run_ablation", "render_ablation_html", "render_ablation_markdown"]

log = logging.getLogger(__name__)

# Grey and white matter: present in every case. Lesions are in some cases only, so a site's
# mean over all labels also reflects how many of its test cases have a lesion.
TISSUE_LABELS = (1, 2)


@dataclass(frozen=True)
class Variant:
    title: str
    kind: str  # "federated", "pooled" or "local"
    run_config: dict = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    "fed-in": Variant("federated IN (FedAvg)", "federated", {"norm": "instance"}),
    "fed-bn": Variant("federated BN (FedAvg)", "federated", {"norm": "batch"}),
    "fedbn": Variant("BN, local norm layers (FedBN)", "federated", {"norm": "batch", "fedbn": True}),
    "fed-gn": Variant("federated GroupNorm (FedAvg)", "federated", {"norm": "group"}),
    "fed-bn-zscore": Variant("federated BN + input z-score", "federated", {"norm": "batch", "zscore": True}),
    "pooled-in": Variant("pooled centralized IN", "pooled"),
    "local-in": Variant("local-only IN (own site)", "local"),
}


@dataclass
class AblationConfig:
    """Size of the ablation; the defaults are the fast run (about 20 minutes on 2 CPU cores).

    Args:
        rounds: federated rounds (``num-server-rounds``).
        local_epochs: epochs per site and round; centralised models train ``rounds * local_epochs``.
        spacing, roi_size, channels, batch_size, samples_per_volume, lr, groups: shared by every variant.
        seed: model init, splits, crops, affine maps.
        k: random affine maps per test volume for the invariance score.
        threshold: fairness threshold on mean Dice.
        sites: site names (default: all under the data folder).
        variants: which of ``VARIANTS`` to run.
        min_sites: fewest sites that must report for a federated round to aggregate.
    """

    rounds: int = 8
    local_epochs: int = 2
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    roi_size: tuple[int, int, int] = (48, 48, 48)
    channels: tuple[int, ...] = (8, 16, 32, 64)
    batch_size: int = 2
    samples_per_volume: int = 2
    lr: float = 3e-3
    groups: int = 4
    seed: int = 0
    k: int = 2
    threshold: float = 0.7
    sites: list[str] | None = None
    variants: tuple[str, ...] = tuple(VARIANTS)
    min_sites: int = 2

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown ablation variant(s) {unknown}; choose from {list(VARIANTS)}")
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError("rounds and local_epochs must be >= 1")
        self.spacing = tuple(float(v) for v in self.spacing)
        self.roi_size = tuple(int(v) for v in self.roi_size)
        self.channels = tuple(int(v) for v in self.channels)

    @classmethod
    def full(cls, **overrides) -> "AblationConfig":
        """The full-size run: 2 mm, 64^3 crops, wider network, more rounds (hours on 2 cores)."""
        base = dict(rounds=20, local_epochs=2, spacing=(2.0, 2.0, 2.0), roi_size=(64, 64, 64),
                    channels=(16, 32, 64, 128), lr=1e-3, k=5)
        return cls(**{**base, **overrides})

    def model_config(self, norm: str) -> ModelConfig:
        return ModelConfig(norm=norm, channels=self.channels, strides=(2,) * (len(self.channels) - 1), groups=self.groups)

    def data_config(self, zscore: bool = False) -> DataConfig:
        return DataConfig(spacing=self.spacing, roi_size=self.roi_size, batch_size=self.batch_size,
                          samples_per_volume=self.samples_per_volume, zscore=zscore)

    def run_config(self, variant: Variant) -> dict:
        return {
            "num-server-rounds": self.rounds, "local-epochs": self.local_epochs, "strategy": "fedavg",
            "channels": ",".join(map(str, self.channels)), "roi-size": ",".join(map(str, self.roi_size)),
            "spacing": ",".join(f"{v:g}" for v in self.spacing), "batch-size": self.batch_size,
            "samples-per-volume": self.samples_per_volume, "lr": self.lr, "groups": self.groups, "seed": self.seed,
            "min-sites": self.min_sites, **variant.run_config,
        }


def _evaluate(model, cfg: DataConfig, data_dir, config: AblationConfig) -> tuple[list[SiteEvaluation], list[dict]]:
    return evaluate_sites(model, data_dir, cfg, sites=config.sites, k=config.k, gammas=(), bias_strengths=(),
                          seed=config.seed, hd95=False)


def _site_scores(evaluations: Sequence[SiteEvaluation]) -> dict[str, dict]:
    """Per site: mean foreground Dice, per-label Dice and affine agreement."""
    out = {}
    for e in evaluations:
        labels = sorted({k for c in e.cases for k in c["dice"]})
        per_label = {k: nanmean(c["dice"][k] for c in e.cases) for k in labels}
        case_means = [nanmean(c["dice"].values()) for c in e.cases]
        tissue = [nanmean(c["dice"].get(k, math.nan) for k in TISSUE_LABELS) for c in e.cases]
        inv = summarize_checks(e.affine_checks)
        out[e.site] = {"dice": nanmean(case_means), "tissue_dice": nanmean(tissue), "dice_per_label": per_label,
                       "n_cases": len(e.cases), "invariance_mean": inv["mean"], "invariance_min": inv["min"]}
    return out


def _summary(name: str, variant: Variant, sites: dict[str, dict], config: AblationConfig, **extra) -> dict:
    fairness = summarize_sites({s: v["dice"] for s, v in sites.items()}, config.threshold)
    tissue = summarize_sites({s: v["tissue_dice"] for s, v in sites.items()}, config.threshold)
    inv_means = [v["invariance_mean"] for v in sites.values()]
    inv_mins = [v["invariance_min"] for v in sites.values()]
    return {
        "name": name, "title": variant.title, "kind": variant.kind, "sites": sites,
        "mean_dice": fairness.mean, "worst_site": fairness.worst_site, "worst_dice": fairness.worst,
        "gap": fairness.gap, "ratio": fairness.ratio, "std": fairness.std, "flagged": fairness.flagged,
        "tissue": {"mean": tissue.mean, "worst_site": tissue.worst_site, "worst": tissue.worst, "gap": tissue.gap,
                   "ratio": tissue.ratio, "std": tissue.std, "flagged": tissue.flagged},
        "invariance": nanmean(inv_means), "invariance_min": float(np.nanmin(inv_mins)) if np.isfinite(inv_mins).any() else math.nan,
        **extra,
    }


def _train_central(sites, mcfg: ModelConfig, dcfg: DataConfig, epochs: int, config: AblationConfig):
    import torch

    from shared.model import build_unet
    from shared.training import train_on_sites

    torch.manual_seed(config.seed)
    model = build_unet(mcfg)
    history = train_on_sites(sites, model, dcfg, epochs, lr=config.lr, seed=config.seed)
    return model.eval(), history


def _federate(run_federation, data_dir, runs: Path, config: AblationConfig, variant: Variant, run_name: str, mode: str,
              echo: Callable[[str], None], attempts: int = 2):
    """One federated variant; a run that did not complete is retried once from scratch."""
    from server.federation import FederationError

    for attempt in range(1, attempts + 1):
        try:
            return run_federation(data_dir, runs, sites=config.sites, run_config=config.run_config(variant),
                                  run_name=run_name, mode=mode)
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
    from shared.registry import data_config_from_meta, load_model, save_model
    from shared.training import discover_sites, load_site

    from server.federation import run_federation

    config = config or AblationConfig()
    out = Path(out_dir)
    runs = out / "runs"
    registry = runs / "registry"
    site_dirs = discover_sites(data_dir, config.sites)
    epochs = config.rounds * config.local_epochs
    results: dict = {"config": asdict(config), "data_dir": str(data_dir), "budget_epochs": epochs,
                     "variants": [], "cross_site": None, "cross_site_tissue": None, "skipped": {}}
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
            summary = _summary(name, variant, _site_scores(evaluations), config, version=fed.version,
                               fed_val_last_round=last_val, history=history.to_dict(), train_seconds=train_seconds)
        elif variant.kind == "pooled":
            dcfg = config.data_config()
            sites = [load_site(p, dcfg, seed=config.seed) for p in site_dirs]
            mcfg = config.model_config("instance")
            model, hist = _train_central(sites, mcfg, dcfg, epochs, config)
            save_model(registry, "ablation-pooled-in", model.state_dict(), mcfg, dcfg, kind="pooled",
                       strategy="centralized", norm="instance", sites=[s.name for s in sites], epochs=epochs, history=hist)
            train_seconds = time.perf_counter() - start
            evaluations, skipped = _evaluate(model, dcfg, data_dir, config)
            summary = _summary(name, variant, _site_scores(evaluations), config, version="ablation-pooled-in",
                               train_seconds=train_seconds)
        else:  # local-only: one model per site, every model on every site
            dcfg, mcfg = config.data_config(), config.model_config("instance")
            matrix: dict[str, dict[str, float]] = {}
            matrix_tissue: dict[str, dict[str, float]] = {}
            own: dict[str, dict] = {}
            train_seconds, skipped = 0.0, []
            for site_dir in site_dirs:
                site = load_site(site_dir, dcfg, seed=config.seed)
                t0 = time.perf_counter()
                model, hist = _train_central([site], mcfg, dcfg, epochs, config)
                train_seconds += time.perf_counter() - t0
                save_model(registry, f"ablation-local-{site.name}", model.state_dict(), mcfg, dcfg, kind="local",
                           strategy="centralized", norm="instance", sites=[site.name], epochs=epochs, history=hist)
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
        echo(f"[ablation] {name}: mean Dice {fmt(summary['mean_dice'])}, worst {summary['worst_site']} "
             f"{fmt(summary['worst_dice'])}, gap {fmt(summary['gap'])}, invariance {fmt(summary['invariance'], 4)} "
             f"({summary['seconds']:.0f}s)")
        _write(results, out, time.perf_counter() - start_all)  # partial results survive an interrupted run
    results["seconds"] = time.perf_counter() - start_all
    _write(results, out, results["seconds"])
    return results


def _sites_of(results: dict) -> list[str]:
    return sorted({s for v in results["variants"] for s in v["sites"]} | set(results.get("cross_site") or {}))


def _csv_rows(results: dict) -> list[dict]:
    rows = []
    for v in results["variants"]:
        for site, s in v["sites"].items():
            row = {"variant": v["name"], "site": site, "n_cases": s["n_cases"], "dice": s["dice"], "tissue_dice": s.get("tissue_dice"),
                   **{f"dice_{k}": d for k, d in s["dice_per_label"].items()},
                   "invariance_mean": s["invariance_mean"], "invariance_min": s["invariance_min"],
                   "fed_val_last_round": (v.get("fed_val_last_round") or {}).get(site, math.nan)}
            rows.append(row)
    tissue = results.get("cross_site_tissue") or {}
    for trained_on, cols in (results.get("cross_site") or {}).items():
        for site, dice in cols.items():
            rows.append({"variant": f"local-in[{trained_on}]", "site": site, "dice": dice,
                         "tissue_dice": tissue.get(trained_on, {}).get(site)})
    return rows


def render_ablation_markdown(results: dict) -> str:
    """A Markdown summary (per-site Dice, gap, worst site, invariance) for bench/results and the README."""
    sites = _sites_of(results)
    c = results["config"]
    lines = [
        f"Data: `{results['data_dir']}`; {c['rounds']} rounds x {c['local_epochs']} local epochs (centralised: "
        f"{results['budget_epochs']} epochs), spacing {c['spacing']} mm, crops {c['roi_size']}, channels {c['channels']}, "
        f"lr {c['lr']}, seed {c['seed']}; invariance: k={c['k']} random s*x+b per test volume. "
        f"Total {results.get('seconds', 0) / 60:.1f} min.",
        "",
        "| variant | " + " | ".join(sites) + " | mean | worst site | gap | invariance (mean / min) |",
        "|---|" + "---:|" * len(sites) + "---:|---|---:|---:|",
    ]
    lines.insert(1, "")
    lines.insert(2, "Mean Dice over grey matter, white matter and lesion (per case, labels absent from a case skipped), "
                    "held-out test cases:")
    for v in results["variants"]:
        cells = [fmt(v["sites"].get(s, {}).get("dice")) for s in sites]
        lines.append(f"| {v['title']} | " + " | ".join(cells) + f" | {fmt(v['mean_dice'])} | {v['worst_site']} "
                     f"({fmt(v['worst_dice'])}) | {fmt(v['gap'])} | {fmt(v['invariance'], 4)} / {fmt(v['invariance_min'], 4)} |")
    lines += ["", "Tissue Dice (mean of grey and white matter, present in every case):", "",
              "| variant | " + " | ".join(sites) + " | mean | worst site | gap | worst/best |",
              "|---|" + "---:|" * len(sites) + "---:|---|---:|---:|"]
    for v in results["variants"]:
        t = v.get("tissue") or {}
        cells = [fmt(v["sites"].get(s, {}).get("tissue_dice")) for s in sites]
        lines.append(f"| {v['title']} | " + " | ".join(cells) + f" | {fmt(t.get('mean'))} | {t.get('worst_site')} "
                     f"({fmt(t.get('worst'))}) | {fmt(t.get('gap'))} | {fmt(t.get('ratio'))} |")
    for key, what in (("cross_site", "mean Dice"), ("cross_site_tissue", "tissue Dice")):
        if results.get(key):
            lines += ["", f"Local-only IN models, cross-site {what} (row: trained on, column: evaluated on):", "",
                      "| trained on | " + " | ".join(sites) + " |", "|---|" + "---:|" * len(sites)]
            for trained_on, cols in results[key].items():
                lines.append(f"| {trained_on} | " + " | ".join(fmt(cols.get(s)) for s in sites) + " |")
    fed = [v for v in results["variants"] if v.get("fed_val_last_round")]
    if fed:
        lines += ["", "Federated validation Dice of the last round (each site's own split; FedBN with its local norm layers):", "",
                  "| variant | " + " | ".join(sites) + " |", "|---|" + "---:|" * len(sites)]
        for v in fed:
            lines.append(f"| {v['title']} | " + " | ".join(fmt(v['fed_val_last_round'].get(s)) for s in sites) + " |")
    return "\n".join(lines) + "\n"


def render_ablation_html(results: dict) -> str:
    sites = _sites_of(results)
    variants = results["variants"]
    headers = ["variant"] + sites + ["mean", "worst site", "worst", "gap", "worst/best", "std", "invariance mean", "invariance min", "minutes"]
    rows = [[v["title"]] + [v["sites"].get(s, {}).get("dice") for s in sites]
            + [v["mean_dice"], v["worst_site"] or "–", v["worst_dice"], v["gap"], v["ratio"], v["std"],
               v["invariance"], v["invariance_min"], v["seconds"] / 60] for v in variants]
    c = results["config"]
    intro = (f"<p>Same data, rounds and budget for every variant: {c['rounds']} rounds × {c['local_epochs']} local epochs "
             f"(centralised models: {results['budget_epochs']} epochs), spacing {c['spacing']} mm, crops {c['roi_size']}, "
             f"channels {c['channels']}, lr {c['lr']}, seed {c['seed']}. Dice: mean foreground Dice on each site's held-out "
             f"test cases. Invariance: Dice between predictions before and after {c['k']} random s·x+b maps per test volume "
             "(s in [0.2, 5], b in [−1000, 1000]). The FedBN row evaluates its global checkpoint (averaged norm layers); "
             "its local-norm performance is the federated validation Dice below.</p>")
    tissue_rows = [[v["title"]] + [v["sites"].get(s, {}).get("tissue_dice") for s in sites]
                   + [(v.get("tissue") or {}).get(k) for k in ("mean", "worst_site", "worst", "gap", "ratio", "std")] for v in variants]
    sections = [("Per-site Dice, gap, worst site and invariance", intro + table(headers, rows)),
                ("Tissue Dice (grey and white matter)",
                 "<p>Lesions occur in some test cases only, so the mean over all labels also reflects each site's lesion count; "
                 "grey and white matter are in every case.</p>"
                 + table(["variant"] + sites + ["mean", "worst site", "worst", "gap", "worst/best", "std"], tissue_rows))]
    if variants:
        sections.append(("Per-site Dice by variant", image(
            figures.grouped_bars(sites, {v["name"]: [v["sites"].get(s, {}).get("dice", math.nan) for s in sites] for v in variants},
                                 "mean Dice (test)", results["config"]["threshold"]), "per-site Dice by variant")))
        sections.append(("Invariance by variant", image(
            figures.grouped_bars(sites, {v["name"]: [v["sites"].get(s, {}).get("invariance_mean", math.nan) for s in sites] for v in variants},
                                 "Dice(pred(x), pred(s·x+b))"), "invariance by variant")))
    for key, what in (("cross_site", "mean Dice"), ("cross_site_tissue", "tissue Dice")):
        if results.get(key):
            m = results[key]
            sections.append((f"Local-only models across sites ({what})",
                             "<p>Row: the site a model was trained on; column: the site it is evaluated on.</p>"
                             + table(["trained on \\ evaluated on"] + sites, [[t] + [cols.get(s) for s in sites] for t, cols in m.items()])))
    fed = [v for v in variants if v.get("fed_val_last_round")]
    if fed:
        sections.append(("Federated validation Dice, last round", table(
            ["variant"] + sites, [[v["title"]] + [v["fed_val_last_round"].get(s) for s in sites] for v in fed])))
        curves = {v["name"]: (v["history"]["rounds"], [nanmean(vals) for vals in zip(*v["history"]["sites"].values())]) for v in fed
                  if v["history"]["rounds"]}
        if curves:
            sections.append(("Mean federated validation Dice over rounds", image(
                figures.history_plot(next(iter(curves.values()))[0], {k: c[1] for k, c in curves.items()}), "validation Dice over rounds")))
    if results.get("skipped"):
        items = "".join(f"<li>{html.escape(k)}: {html.escape(json.dumps(v))}</li>" for k, v in results["skipped"].items())
        sections.append(("Skipped sites", f"<ul>{items}</ul>"))
    return page("Normalisation ablation: who is left behind?", sections,
                f"{len(variants)} variants, total {results.get('seconds', 0) / 60:.1f} min")


def _write(results: dict, out: Path, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    snapshot = {**results, "seconds": results.get("seconds", seconds)}
    (out / "ablation.json").write_text(json.dumps(to_jsonable(snapshot), indent=1) + "\n")
    write_csv(out / "ablation.csv", _csv_rows(snapshot))
    (out / "ablation.md").write_text(render_ablation_markdown(snapshot))
    (out / "ablation.html").write_text(render_ablation_html(snapshot), encoding="utf-8")
