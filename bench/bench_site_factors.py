"""Which of hospital-d's scanner factors costs its tissue Dice: the same subjects, one factor undone at a time.

Hospital-d is the demo's worst site. Its scanner differs from a clean one in four ways besides the
affine that instance norm cancels: a gamma curve (0.6), a 30 % coil field, 3 mm slices and more noise
(0.015 vs 0.01). This renders hospital-d's test subjects (its 3, plus more from the same generator
stream for tighter intervals) once as hospital-d and once with each factor undone, scores one model
on every version on each case's own label grid, and gives the paired per-case difference (variant
minus hospital-d) with a bootstrap 95 % CI (``server.experiments.stats``).

The model: a served registry version (``--registry`` / ``--version``), or by default the demo
network trained pooled on the demo sites' training cases with the demo's augmentation (lesion
paste, coil field) for ``--steps`` optimiser steps, like ``bench/pooled_recipe.py``.

Run: .venv/bin/python bench/bench_site_factors.py   (~4 min on 2 cores)  ->  bench/results/site_factors.{json,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"


def variants(profile) -> dict:
    """hospital-d's profile, each of its non-affine factors undone alone, and all of them undone."""
    clean_noise = 0.01  # hospitals a-c
    return {
        "hospital-d": profile,
        "no gamma curve": dataclasses.replace(profile, gamma=1.0),
        "no coil field": dataclasses.replace(profile, bias_strength=0.0),
        "2 mm slices": dataclasses.replace(profile, spacing=(2.0, 2.0, 2.0)),
        "noise 0.01": dataclasses.replace(profile, noise_std=clean_noise),
        "all undone (a clean scanner)": dataclasses.replace(
            profile, gamma=1.0, bias_strength=0.0, spacing=(2.0, 2.0, 2.0), noise_std=clean_noise
        ),
    }


def pooled_model(data: Path, steps: int, cfg):
    """The demo network trained on every demo site's training cases (``shared.training.train_on_sites``)."""
    import torch

    from shared.model import build_unet
    from shared.training import discover_sites, load_site, train_on_sites

    torch.manual_seed(0)  # the initial weights; train_on_sites seeds the crops
    net = build_unet()
    sites = [load_site(s, cfg) for s in discover_sites(data)]
    train_on_sites(sites, net, cfg, epochs=10**6, lr=3e-3, lr_schedule="poly", max_steps=steps)
    return net


def main() -> int:
    import numpy as np
    import torch

    from server.experiments.stats import claim, paired_difference
    from shared.data import DataConfig, find_cases
    from shared.registry import data_config_from_meta, load_model, served_version
    from shared.synth import DEMO_SITES, SiteSpec, generate_site
    from shared.training import evaluate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO / "data"), help="the demo sites (fedmri generate)")
    p.add_argument("--registry", help="score this registry's model instead of training one")
    p.add_argument("--version", help="registry version (default: the served one)")
    p.add_argument("--steps", type=int, default=900, help="pooled training steps when no --registry")
    p.add_argument("--cases", type=int, default=12, help="test subjects per version (the first 3 are hospital-d's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--markdown-only", action="store_true", help="rewrite site_factors.md from site_factors.json")
    args = p.parse_args()
    if args.markdown_only:
        result = json.loads((Path(args.out) / "site_factors.json").read_text())
        (Path(args.out) / "site_factors.md").write_text(markdown(result))
        return 0

    torch.set_num_threads(args.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    if args.registry:
        version = args.version or served_version(args.registry)
        net, meta = load_model(args.registry, version)
        cfg = data_config_from_meta(meta)
        model_text = f"registry version `{version}`"
    else:
        cfg = DataConfig(roi_size=(48, 48, 48), samples_per_volume=4, bias_field_prob=0.3, lesion_paste_prob=1.0)
        net = pooled_model(Path(args.data), args.steps, cfg)
        model_text = (f"the demo network trained pooled on the demo sites' training cases, {args.steps} steps, "
                      "demo augmentation (coil field p 0.3, lesion paste p 1.0)")
    net.eval()
    train_s = time.perf_counter() - start

    spec = next(s for s in DEMO_SITES if s.name == "hospital-d")
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="site-factors-") as tmp:
        for i, (name, profile) in enumerate(variants(spec.profile).items()):
            # Same name and seed: the generator draws the same subjects and scanner noise streams.
            site = generate_site(Path(tmp) / str(i), SiteSpec(spec.name, profile, n_train=0, n_test=args.cases))
            result = evaluate(net, find_cases(site, "test"), cfg)
            tissue = [(c["dice"][1] + c["dice"][2]) / 2 for c in result.per_case]
            rows[name] = {"profile": dataclasses.asdict(profile), "tissue_per_case": [round(t, 4) for t in tissue],
                          "tissue": round(float(np.mean(tissue)), 4)}
            print(f"{name}: tissue {rows[name]['tissue']:.3f}", flush=True)
    base = rows["hospital-d"]["tissue_per_case"]
    claims = []
    for name, row in rows.items():
        if name == "hospital-d":
            continue
        row["minus_hospital_d"] = paired_difference(row["tissue_per_case"], base)
        claims.append(claim(name, "hospital-d", "hospital-d's subjects", row["minus_hospital_d"], "tissue Dice"))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": model_text,
        "cases": args.cases,
        "seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(train_s, 1),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "variants": rows,
        "claims": claims,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "site_factors.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "site_factors.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [
        "# Hospital-d's tissue Dice, one scanner factor undone at a time",
        "",
        f"`bench/bench_site_factors.py`, {r['date']}; {r['cases']} subjects of hospital-d's generator stream "
        f"(its 3 test cases first), each rendered once per row; model: {r['model']}. "
        f"Load before {r['load_before']}, after {r['load_after']}; {r['seconds']} s.",
        "",
        "| scanner | tissue Dice (mean of GM, WM) | minus hospital-d, paired [95 % CI] |",
        "|---|---|---|",
    ]
    for name, row in r["variants"].items():
        d = row.get("minus_hospital_d")
        diff = "–" if d is None else f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
        lines.append(f"| {name} | {row['tissue']:.4f} | {diff} |")
    lines += ["", *(f"- {c}" for c in r["claims"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
