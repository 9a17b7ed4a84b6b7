"""Matplotlib figures of the report, returned as PNG bytes.

Uses ``matplotlib.figure.Figure`` directly (no pyplot state), so figures can be drawn from
API worker threads without a display.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

__all__ = [
    "to_png",
    "dice_by_site",
    "intensity_histograms",
    "where_in_stops_plot",
    "example_slices",
    "history_plot",
    "grouped_bars",
]

# Colours of labels 1..3 (grey matter, white matter, lesion); 0 stays transparent.
LABEL_COLOURS = ListedColormap([(0, 0, 0, 0), (0.95, 0.6, 0.1, 0.55), (0.2, 0.55, 0.95, 0.55), (0.9, 0.1, 0.2, 0.8)])


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def dice_by_site(rows: Sequence[dict], threshold: float) -> bytes:
    """Mean Dice per site with its bootstrap interval, and the flagging threshold."""
    fig = Figure(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.2))
    ax = fig.subplots()
    names = [r["site"] for r in rows]
    means = np.array([r["dice"]["mean"]["mean"] for r in rows], dtype=float)
    lows = np.array([r["dice"]["mean"]["low"] for r in rows], dtype=float)
    highs = np.array([r["dice"]["mean"]["high"] for r in rows], dtype=float)
    colours = ["tab:red" if m < threshold else "tab:green" for m in means]
    ax.bar(names, np.nan_to_num(means), color=colours, alpha=0.8)
    ax.errorbar(
        names,
        np.nan_to_num(means),
        yerr=[np.nan_to_num(means - lows), np.nan_to_num(highs - means)],
        fmt="none",
        ecolor="black",
        capsize=4,
    )
    ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean foreground Dice (95% CI)")
    ax.legend(loc="lower right", fontsize=8)
    return to_png(fig)


def intensity_histograms(histograms: dict[str, dict]) -> bytes:
    """Raw intensity distributions of every site on one axis: the scanner shifts made visible."""
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    for site, hist in histograms.items():
        edges, density = np.asarray(hist["edges"]), np.asarray(hist["density"])
        ax.stairs(density, edges, label=site, lw=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("raw intensity (as stored by the site's scanner)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return to_png(fig)


def where_in_stops_plot(affine_mean: dict[str, float], stops: dict[str, dict[str, list[tuple[float, float]]]]) -> bytes:
    """Agreement Dice vs perturbation strength, one line per site, gamma and bias side by side.

    Args:
        affine_mean: site -> mean agreement under random affine maps (drawn as a dotted reference).
        stops: kind ("gamma"/"bias") -> site -> [(level, mean agreement Dice), ...].
    """
    kinds = [k for k in ("gamma", "bias") if k in stops]
    fig = Figure(figsize=(4 * max(1, len(kinds)) + 1, 3.2))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(kinds)), sharey=True))
    xlabels = {"gamma": "gamma of the contrast curve (1 = identity)", "bias": "bias field peak amplitude (0 = none)"}
    for ax, kind in zip(axes, kinds):
        identity = 1.0 if kind == "gamma" else 0.0
        for i, (site, points) in enumerate(sorted(stops[kind].items())):
            colour = f"C{i}"
            xs = [identity] + [p[0] for p in points]
            ys = [affine_mean.get(site, math.nan)] + [p[1] for p in points]
            order = np.argsort(xs)
            ax.plot(np.asarray(xs)[order], np.asarray(ys)[order], "o-", color=colour, label=site)
        ax.set_xlabel(xlabels[kind])
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice(pred(x), pred(T(x)))")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Where instance norm stops: identity point = mean under random s*x+b", fontsize=9)
    return to_png(fig)


def example_slices(examples: dict[str, dict]) -> bytes:
    """Per site: the raw slice, the ground truth and the predicted mask overlaid."""
    n = max(1, len(examples))
    fig = Figure(figsize=(7.5, 2.6 * n))
    axes = np.atleast_2d(fig.subplots(n, 3))
    for row, (site, ex) in zip(axes, examples.items()):
        image = np.rot90(ex["image"])
        for ax, title, mask in zip(row, ("raw", "ground truth", "prediction"), (None, ex["truth"], ex["pred"])):
            ax.imshow(image, cmap="gray")
            if mask is not None:
                ax.imshow(np.rot90(mask), cmap=LABEL_COLOURS, vmin=0, vmax=3, interpolation="nearest")
            ax.set_title(f"{site}: {title}" if title == "raw" else title, fontsize=9)
            ax.axis("off")
    return to_png(fig, dpi=80)


def history_plot(rounds: Sequence[int], sites: dict[str, Sequence[float]]) -> bytes:
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    for site, values in sorted(sites.items()):
        ax.plot(list(rounds), list(values), "o-", label=site)
    ax.set_xlabel("federated round")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_png(fig)


def grouped_bars(
    groups: Sequence[str], series: dict[str, Sequence[float]], ylabel: str, threshold: float | None = None
) -> bytes:
    """Bars of ``series[name][i]`` for each group ``i`` (e.g. per-site Dice of every ablation variant)."""
    fig = Figure(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(series)) / 2 + 3), 3.4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(
            x + (i - (len(series) - 1) / 2) * width, np.nan_to_num(np.asarray(values, dtype=float)), width, label=name
        )
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", ls="--", lw=1)
    ax.set_xticks(x, list(groups))
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)
    return to_png(fig)
