"""Foundation benchmark: data generation time per subject and training steps per second (CPU).

Run: .venv/bin/python bench/bench_foundation.py  ->  bench/results/foundation.{json,md}
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from shared.data import DataConfig, find_cases, make_train_loader
from shared.model import ModelConfig, build_unet, count_parameters
from shared.scanner import ScannerProfile
from shared.synth import SiteSpec, generate_site, mni_template
from shared.training import train_epochs

RESULTS = Path(__file__).parent / "results"


def time_generation(resolution: int, n: int, out: Path) -> float:
    mni_template(resolution)  # template loading is a one-off per process; not per subject
    spacing = (float(resolution),) * 3
    spec = SiteSpec(
        f"bench-{resolution}mm",
        ScannerProfile(scale=2, shift=100, gamma=0.8, bias_strength=0.2, noise_std=0.01, spacing=spacing),
        n_train=n,
        n_test=0,
    )
    start = time.perf_counter()
    generate_site(out, spec, seed=0, resolution=resolution)
    return (time.perf_counter() - start) / n


def time_training(site: Path, roi: int, channels: tuple[int, ...], steps: int) -> dict:
    dcfg = DataConfig(roi_size=(roi,) * 3)
    mcfg = ModelConfig(channels=channels, strides=(2,) * (len(channels) - 1))
    loader = make_train_loader(find_cases(site), dcfg)
    model = build_unet(mcfg)
    train_epochs(model, loader, epochs=1, max_steps=2)  # warm-up
    done, seconds = 0, 0.0
    while done < steps:
        stats = train_epochs(model, loader, epochs=1, max_steps=steps - done)
        done += stats["steps"]
        seconds += stats["seconds"]
    crops = dcfg.batch_size * dcfg.samples_per_volume
    return {
        "roi": roi,
        "channels": list(channels),
        "parameters": count_parameters(model),
        "crops_per_step": crops,
        "steps": done,
        "steps_per_second": done / seconds,
        "seconds_per_step": seconds / done,
    }


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        gen = {
            "2mm_seconds_per_subject": time_generation(2, 4, out),
            "1mm_seconds_per_subject": time_generation(1, 1, out),
        }
        site = out / "bench-2mm"
        train = [time_training(site, 64, (8, 16, 32, 64), 20), time_training(site, 96, (16, 32, 64, 128), 6)]
    result = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "generation": gen,
        "training": train,
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "foundation.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| what | value |",
        "|---|---|",
        f"| data generation, 2 mm subject | {gen['2mm_seconds_per_subject']:.2f} s |",
        f"| data generation, 1 mm subject | {gen['1mm_seconds_per_subject']:.2f} s |",
    ]
    for t in train:
        lines.append(
            f"| training, {t['roi']}^3 crops x{t['crops_per_step']}, channels {t['channels']} "
            f"({t['parameters']:,} params) | {t['steps_per_second']:.2f} steps/s |"
        )
    (RESULTS / "foundation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
