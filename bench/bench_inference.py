"""Sliding-window inference against the machine's compute floor.

floor = FLOPs of the work actually done (windows x FLOPs of one window, counted by
``torch.utils.flop_counter`` on the float32 network) / the throughput of a dense 3-D convolution
(32 -> 32 channels, 3^3 kernel, 64^3 voxels) measured in the same run, interleaved with the
forwards so background load hits both alike. ``forward / floor`` is how far the forward is from
what the machine's convolution speed allows for that work; the overlap's share of the work
(voxels run through the network twice or more) is reported beside it.

Two models on the same 1 mm brain (MNI152 2009a grid, 197x233x189, ``shared.synth``):
``large_1mm`` (channels 16-128, roi 96, 1 mm grid: 27 windows) and ``demo`` (the default model:
channels 8-64, roi 64, 2 mm grid). Variants: MONAI's ``sliding_window_inference`` as
``shared.training.predict_logits`` calls it, and ``shared.inferer.SlidingWindowPredictor`` with
float32 / channels_last_3d / bf16 (first conv float32) / one window covering the volume / the optional
OpenVINO and ONNX Runtime backends (where installed).
Each variant's labels are compared with MONAI's (share of equal voxels); weights are random
(timings do not depend on them; random logits sit nearer ties than a trained model's, so the
agreement is a pessimistic figure).

Run: .venv/bin/python bench/bench_inference.py [--quick]  ->  bench/results/inference.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shared.data import DataConfig  # noqa: E402
from shared.inferer import (  # noqa: E402
    InferenceOptions,
    SlidingWindowPredictor,
    bf16_supported,
    covering_window,
    network_flops,
    onnxruntime_available,
    openvino_available,
    window_plan,
)
from shared.model import ModelConfig, build_unet, count_parameters  # noqa: E402
from shared.training import predict_logits  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODELS = {
    "large_1mm": (ModelConfig(channels=(16, 32, 64, 128)), DataConfig(roi_size=(96, 96, 96), spacing=(1.0, 1.0, 1.0))),
    "demo": (ModelConfig(), DataConfig()),
}
AGREEMENT_TOLERANCE = 0.999  # share of voxels whose label equals MONAI's, for a variant to count as "same prediction"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def brain_volume(spacing) -> torch.Tensor:
    """The 1 mm synthetic brain through a hospital-b-like scanner, preprocessed as the API does (RAS, spacing)."""
    from monai.data import MetaTensor

    from server.api.inference import preprocessing
    from shared.scanner import ScannerProfile, apply_scanner
    from shared.synth import synthesize_subject

    subject = synthesize_subject(seed=11, resolution=1, lesion_probability=1.0)
    image = apply_scanner(
        subject.signal,
        ScannerProfile(scale=4.0, shift=-300.0, noise_std=0.01, spacing=(1.0, 1.0, 1.0)),
        np.random.default_rng(11),
    ).astype(np.float32)
    volume = MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(subject.affine, dtype=torch.float64),
                        meta={"original_channel_dim": "no_channel"})
    prepared = preprocessing(DataConfig(spacing=spacing))({"image": volume})["image"]
    return prepared.as_tensor().float().contiguous()


class DenseConv:
    """A dense 3-D convolution whose FLOP rate is the machine's convolution throughput."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self.conv = torch.nn.Conv3d(32, 32, 3, padding=1).eval()
        self.x = torch.randn(1, 32, 64, 64, 64)
        self.dtype = dtype
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            self.conv(self.x)
        self.flops = counter.get_total_flops()
        self.samples: list[float] = []

    def measure(self) -> float:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype != torch.float32):
            self.conv(self.x)  # warm
            start = time.perf_counter()
            self.conv(self.x)
            seconds = time.perf_counter() - start
        self.samples.append(self.flops / seconds)
        return self.samples[-1]

    @property
    def gflops(self) -> float:
        """Best measured rate (the machine's capability; load only ever lowers it)."""
        return max(self.samples) / 1e9


def variants(cfg: DataConfig, shape, quick: bool) -> dict[str, dict]:
    out = {
        "monai": {"kind": "monai"},
        "fp32": {"options": InferenceOptions()},
        "fp32_channels_last": {"options": InferenceOptions(channels_last=True)},
    }
    if bf16_supported("cpu"):
        out["bf16"] = {"options": InferenceOptions(precision="bf16")}
        if not quick:
            out["bf16_channels_last"] = {"options": InferenceOptions(precision="bf16", channels_last=True)}
    if openvino_available():  # the optional backends (pip install '.[openvino]' / '.[onnxruntime]')
        out["openvino"] = {"options": InferenceOptions(backend="openvino")}
    if onnxruntime_available():
        out["onnxruntime"] = {"options": InferenceOptions(backend="onnxruntime")}
    window = covering_window(shape, cfg.roi_size, multiple=8)
    if window_plan(shape, window).windows < window_plan(shape, cfg.roi_size).windows:
        out["fp32_one_window"] = {"options": InferenceOptions(window=window)}
    return out


def bench_model(name: str, repeats: int, quick: bool, dense: DenseConv, dense_bf16: DenseConv | None) -> dict:
    mcfg, dcfg = MODELS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = build_unet(mcfg).eval()
    image = brain_volume(dcfg.spacing)
    shape = tuple(image.shape[1:])
    var = variants(dcfg, shape, quick)
    runners = {}
    for key, spec in var.items():
        if spec.get("kind") == "monai":
            runners[key] = (lambda: predict_logits(net, image, dcfg.roi_size), dcfg.roi_size, 0.25)
        else:
            predictor = SlidingWindowPredictor(net, dcfg.roi_size, spec["options"])
            runners[key] = (lambda p=predictor: p.logits(image), predictor.window, spec["options"].overlap)

    def layout(key: str) -> None:
        options = var[key].get("options")
        fmt = torch.channels_last_3d if options is not None and options.channels_last else torch.contiguous_format
        net.to(memory_format=fmt)

    labels = {}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for key, (fn, _, _) in runners.items():  # warm-up, and the labels for the agreement
        layout(key)
        labels[key] = fn().argmax(1)
    for _ in range(repeats):  # interleaved, with the dense convolution between
        for key, (fn, _, _) in runners.items():
            dense.measure()
            if dense_bf16 is not None:
                dense_bf16.measure()
            layout(key)
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    net.to(memory_format=torch.contiguous_format)
    rows = {}
    for key, (_, window, overlap) in runners.items():
        plan = window_plan(shape, window, overlap)
        flops = plan.windows * network_flops(net, window)
        rows[key] = {
            "seconds": [round(t, 4) for t in times[key]],
            "median_seconds": round(statistics.median(times[key]), 4),
            "flops": flops,
            "gflop": round(flops / 1e9, 3),
            "plan": plan.to_dict(),
            "label_agreement_with_monai": round(float((labels[key] == labels["monai"]).float().mean()), 6),
        }
    same = {k: r for k, r in rows.items() if r["label_agreement_with_monai"] >= AGREEMENT_TOLERANCE}
    best = min(same, key=lambda k: rows[k]["median_seconds"])
    return {
        "model": name,
        "channels": list(mcfg.channels),
        "parameters": count_parameters(net),
        "roi_size": list(dcfg.roi_size),
        "spacing_mm": list(dcfg.spacing),
        "network_input_shape": list(shape),
        "variants": rows,
        "best_same_prediction": best,
        "overlap_share": rows[best]["plan"]["overlap_share"],
    }


def add_floors(models: list[dict], dense: DenseConv, dense_bf16: DenseConv | None) -> None:
    """Every variant's floor and forward/floor from the run's best dense-convolution sample (the one
    reported; it is known only once every model was timed, since a later sample can only raise it)."""
    for m in models:
        for key, row in m["variants"].items():
            seconds, floor = row["median_seconds"], row["flops"] / (dense.gflops * 1e9)
            row["floor_seconds"] = round(floor, 4)
            row["forward_over_floor"] = round(seconds / floor, 3)
            if "bf16" in key and dense_bf16 is not None:
                row["forward_over_floor_bf16_conv"] = round(seconds / (row["flops"] / (dense_bf16.gflops * 1e9)), 3)
        m["forward_over_floor"] = m["variants"][m["best_same_prediction"]]["forward_over_floor"]
        m["monai_over_floor"] = m["variants"]["monai"]["forward_over_floor"]


def invariance(name: str = "demo") -> dict:
    """Label agreement of the API's fast path under s*x+b (the product's invariance) on the demo model."""
    from server.api.inference import preprocessing  # noqa: F401  (same import path as the API)

    mcfg, dcfg = MODELS[name]
    torch.manual_seed(0)
    net = build_unet(mcfg).eval()
    image = brain_volume(dcfg.spacing)
    out = {}
    options = {"fp32": InferenceOptions()}
    if bf16_supported("cpu"):
        options["bf16"] = InferenceOptions(precision="bf16")
    if openvino_available():
        options["openvino"] = InferenceOptions(backend="openvino")
    if onnxruntime_available():
        options["onnxruntime"] = InferenceOptions(backend="onnxruntime")
    for key, option in options.items():
        predictor = SlidingWindowPredictor(net, dcfg.roi_size, option)
        base = predictor.labels(image)
        out[key] = [
            round(float((predictor.labels(s * image + b) == base).float().mean()), 6)
            for s, b in ((0.25, -500.0), (4.0, 300.0))
        ]
    return out


def run(quick: bool = False, out_dir: Path = RESULTS, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    load_before = loadavg()
    dense = DenseConv()
    dense_bf16 = DenseConv(torch.bfloat16) if bf16_supported("cpu") else None
    repeats = 2 if quick else 5
    models = [bench_model(name, repeats, quick, dense, dense_bf16) for name in MODELS]
    add_floors(models, dense, dense_bf16)
    result = {
        "benchmark": "sliding-window inference vs compute floor",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": quick,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "bf16_native": bf16_supported("cpu"),
        "dense_conv_gflops": round(dense.gflops, 2),
        "dense_conv_gflops_samples": [round(v / 1e9, 2) for v in dense.samples],
        "dense_conv_bf16_gflops": round(dense_bf16.gflops, 2) if dense_bf16 else None,
        "agreement_tolerance": AGREEMENT_TOLERANCE,
        "models": models,
        "invariance_label_agreement": invariance(),
        "load_average_before": load_before,
        "load_average_after": loadavg(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "inference.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out_dir / "inference.md")
    return result


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Inference vs compute floor",
        "",
        f"{result['date']}, {result['cpus']} CPUs, {result['torch_threads']} torch threads, torch {result['torch']}; "
        f"load average {result['load_average_before']} before, {result['load_average_after']} after "
        f"(the machine is shared). Dense conv3d (32->32, 3^3, 64^3): {result['dense_conv_gflops']} GFLOP/s float32"
        + (f", {result['dense_conv_bf16_gflops']} GFLOP/s bf16" if result["dense_conv_bf16_gflops"] else "")
        + " (best sample of the run). Floor = FLOPs done / float32 dense throughput.",
        "",
        "| model | variant | windows | overlap share | GFLOP | forward (s) | floor (s) | forward / floor"
        " | labels = MONAI's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        for key, r in m["variants"].items():
            mark = " (kept)" if key == m["best_same_prediction"] else ""
            lines.append(
                f"| {m['model']} | {key}{mark} | {r['plan']['windows']} | {r['plan']['overlap_share']:.2f}"
                f" | {r['gflop']:.1f} | {r['median_seconds']:.3f} | {r['floor_seconds']:.3f}"
                f" | **{r['forward_over_floor']:.2f}** | {r['label_agreement_with_monai']:.4f} |"
            )
    lines += [
        "",
        f"'kept': the fastest variant whose labels equal MONAI's on >= {result['agreement_tolerance']:.1%} of voxels "
        "(random weights). Invariance of the fast path to s*x+b (label agreement, demo model): "
        f"{json.dumps(result['invariance_label_agreement'])}.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.quick, out_dir=args.out, threads=args.threads)
    for m in result["models"]:
        print(m["model"], m["best_same_prediction"], m["forward_over_floor"], "MONAI:", m["monai_over_floor"])


if __name__ == "__main__":
    main()
