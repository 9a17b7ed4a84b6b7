"""REST inference benchmark: end-to-end latency of POST /v1/segment for a 1 mm brain volume vs
the in-process sliding-window forward on the same volume, and throughput with 4 concurrent clients.

Everything is measured in one run, interleaved (forward, in-process pipeline, REST, repeat), so a
change in background load hits all three alike. The server is `fedmri serve` in its own process
on a loopback port, with the same torch thread count as the in-process measurements.

Run: .venv/bin/python bench/bench_api.py  ->  bench/results/api.{json,md}
     (--registry runs/registry [--model VERSION] benchmarks a registered model instead of a fresh
     default-size one; timings do not depend on the weights.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import torch

from server.api.inference import ServedModel, encode_segmentation, preprocessing, segment_volume
from server.api.upload import open_upload
from shared.data import DataConfig
from shared.io import load_volume
from shared.model import ModelConfig, build_unet, count_parameters
from shared.registry import data_config_from_meta, load_model, mark_served, save_model
from shared.scanner import ScannerProfile, apply_scanner
from shared.synth import synthesize_subject
from shared.training import predict_logits

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent

# name -> (model config, data config); "default" is what `fedmri train`/`federate` build without flags.
CONFIGS = {
    "default": (ModelConfig(), DataConfig()),
    # The README's "bigger, for real hardware" configuration.
    "bigger": (ModelConfig(channels=(16, 32, 64, 128), strides=(2, 2, 2)), DataConfig(roi_size=(96, 96, 96))),
}


def make_volume(out: Path) -> Path:
    """A 1 mm synthetic brain (MNI152 2009a grid, 197x233x189) through a hospital-b-like scanner, as .nii.gz."""
    subject = synthesize_subject(seed=11, resolution=1, lesion_probability=1.0)
    image = apply_scanner(
        subject.signal,
        ScannerProfile(scale=4.0, shift=-300.0, noise_std=0.01, spacing=(1.0, 1.0, 1.0)),
        np.random.default_rng(11),
    )
    img = nib.Nifti1Image(image.astype(np.float32), subject.affine)
    img.header.set_qform(subject.affine, code=1)
    img.header.set_sform(subject.affine, code=1)
    img.header.set_xyzt_units("mm")
    path = out / "brain-1mm.nii.gz"
    nib.save(img, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(registry: Path, model: str, threads: int, work: Path) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = work / "server.log"
    env = {**os.environ, "FEDMRI_TORCH_THREADS": str(threads), "FEDMRI_UPLOAD_DIR": str(work)}
    env.pop("FEDMRI_API_KEY", None)
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--port",
                str(port),
                "--registry",
                str(registry),
                "--model",
                model,
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server not ready after 400 s")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nibabel_read(path: Path) -> float:
    """nibabel's plain read and decompress of the upload (the fixed costs' yardstick)."""
    start = time.perf_counter()
    np.asarray(nib.load(str(path)).dataobj)
    return time.perf_counter() - start


def monai_bundle(network: torch.nn.Module, dcfg: DataConfig, work: Path):
    """What a MONAI bundle does, in process: LoadImaged -> EnsureChannelFirstd -> Orientationd ->
    Spacingd -> SlidingWindowInferer -> softmax -> Invertd (probabilities, bilinear) -> argmax ->
    SaveImage (.nii.gz). The same work as fedmri's pipeline: probabilities back to the input grid."""
    from monai import transforms as mt
    from monai.inferers import SlidingWindowInferer

    pre = mt.Compose([
        mt.LoadImaged(keys="image"),
        mt.EnsureChannelFirstd(keys="image"),
        mt.Orientationd(keys="image", axcodes="RAS"),
        mt.Spacingd(keys="image", pixdim=dcfg.spacing, mode="bilinear", padding_mode="border"),
        mt.EnsureTyped(keys="image", dtype=torch.float32),
    ])
    inferer = SlidingWindowInferer(dcfg.roi_size, sw_batch_size=2, overlap=0.25, mode="gaussian",
                                   padding_mode="replicate")
    post = mt.Compose([
        mt.Activationsd(keys="pred", softmax=True),
        mt.Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        mt.AsDiscreted(keys="pred", argmax=True),
        mt.SaveImaged(keys="pred", output_dir=str(work), output_postfix="seg", output_dtype=np.uint8,
                      resample=False, separate_folder=False, print_log=False),
    ])

    def run(path: Path) -> float:
        start = time.perf_counter()
        data = pre({"image": str(path)})
        with torch.no_grad():
            data["pred"] = inferer(data["image"].unsqueeze(0), network)[0]
        post(data)
        return time.perf_counter() - start

    return run


def post(url: str, content: bytes, client: httpx.Client | None = None) -> tuple[float, dict[str, float]]:
    """Seconds from sending the upload to having the whole label map, and the server's stage timings."""
    start = time.perf_counter()
    response = (client or httpx).post(url + "/v1/segment", files={"file": ("volume.nii.gz", content)}, timeout=600)
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"POST /v1/segment: {response.status_code} {response.text[:300]}")
    stages = {}
    for part in response.headers.get("server-timing", "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            stages[name] = float(dur) / 1000
    return seconds, stages


def bench_config(
    name: str,
    registry: Path,
    version: str,
    volume: Path,
    repeats: int,
    clients: int,
    per_client: int,
    threads: int,
    work: Path,
) -> dict:
    model, meta = load_model(registry, version)
    dcfg = data_config_from_meta(meta)
    served = ServedModel(version, model, meta, dcfg)
    content = volume.read_bytes()

    # The network's input, prepared once: the forward alone is what the ratio is measured against.
    image, vol_meta = load_volume(volume)
    from monai.data import MetaTensor

    prepared = preprocessing(dcfg)(
        {
            "image": MetaTensor(
                torch.from_numpy(image),
                affine=torch.as_tensor(vol_meta["affine"]),
                meta={"original_channel_dim": "no_channel"},
            )
        }
    )["image"]

    cpu: dict[str, list[float]] = {"forward": [], "pipeline": [], "rest": []}
    fixed: list[float] = []  # the pipeline's time outside the network forward
    bundle = monai_bundle(model, dcfg, work)

    def forward() -> float:
        start, cpu_start = time.perf_counter(), time.process_time()
        predict_logits(model, prepared, dcfg.roi_size).argmax(1)
        cpu["forward"].append(time.process_time() - cpu_start)
        return time.perf_counter() - start

    def pipeline() -> float:
        """The service's work without HTTP: read and check the .nii.gz, preprocess, forward, map back, encode."""
        folder = Path(tempfile.mkdtemp(dir=work))
        try:
            shutil.copy(volume, folder / "upload")
            start, cpu_start = time.perf_counter(), time.process_time()
            data, meta_ = open_upload(folder / "upload", folder, 512**3)
            seg = segment_volume(served, data, meta_)
            encode_segmentation(seg, folder)
            cpu["pipeline"].append(time.process_time() - cpu_start)
            total = time.perf_counter() - start
            fixed.append(total - seg.timings["inference_s"])
            return total
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    proc, url, _ = start_server(registry, version, threads, work)
    try:
        with httpx.Client() as client:
            forward(), pipeline(), post(url, content, client), bundle(volume)  # warm-up: one-off costs
            for values in cpu.values():
                values.clear()
            fixed.clear()
            times: dict[str, list[float]] = {"forward": [], "pipeline": [], "rest": [], "read": [], "monai_bundle": []}
            stages: list[dict[str, float]] = []
            for _ in range(repeats):
                times["forward"].append(forward())
                times["pipeline"].append(pipeline())
                cpu_start = process_cpu_seconds(proc.pid)
                seconds, server_stages = post(url, content, client)
                cpu["rest"].append(process_cpu_seconds(proc.pid) - cpu_start)  # the server's CPU for this request
                times["rest"].append(seconds)
                stages.append(server_stages)
                times["read"].append(nibabel_read(volume))
                times["monai_bundle"].append(bundle(volume))

        # Throughput: `clients` threads, each sending `per_client` requests back to back.
        latencies: list[float] = []
        if clients == 0:
            clients = per_client = 0
        lock = threading.Lock()

        def client_loop() -> None:
            with httpx.Client() as c:
                barrier.wait()
                for _ in range(per_client):
                    seconds, _ = post(url, content, c)
                    with lock:
                        latencies.append(seconds)

        barrier = threading.Barrier(max(clients, 1))
        workers = [threading.Thread(target=client_loop) for _ in range(clients)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - start
        if len(latencies) != clients * per_client:
            raise RuntimeError("some concurrent requests failed")
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    med = {k: statistics.median(v) for k, v in times.items()}
    med_fixed = statistics.median(fixed)
    stage_median = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    return {
        "config": name,
        "model_version": version,
        "parameters": count_parameters(model),
        "channels": list(meta["model_config"]["channels"]),
        "spacing_mm": list(dcfg.spacing),
        "roi_size": list(dcfg.roi_size),
        "network_input_shape": list(prepared.shape[1:]),
        "repeats": repeats,
        "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "min_seconds": {k: round(min(v), 4) for k, v in times.items()},
        "ratio_rest_vs_forward": round(med["rest"] / med["forward"], 3),
        "ratio_rest_vs_forward_min": round(min(times["rest"]) / min(times["forward"]), 3),
        "ratio_rest_vs_inprocess_pipeline": round(med["rest"] / med["pipeline"], 3),
        "fixed_seconds": [round(x, 4) for x in fixed],
        "median_fixed_seconds": round(med_fixed, 4),
        "ratio_fixed_vs_read": round(med_fixed / med["read"], 3),
        "ratio_rest_vs_monai_bundle": round(med["rest"] / med["monai_bundle"], 3),
        "cpu_seconds": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
        "median_cpu_seconds": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "ratio_rest_vs_forward_cpu": round(statistics.median(cpu["rest"]) / statistics.median(cpu["forward"]), 3),
        "server_stage_median_seconds": {k: round(v, 4) for k, v in stage_median.items()},
        "concurrency": {
            "clients": clients,
            "requests": len(latencies),
            "wall_seconds": round(wall, 3),
            "throughput_per_second": round(len(latencies) / wall, 4),
            "sequential_throughput_per_second": round(1 / med["rest"], 4),
            "latency_p50_seconds": round(statistics.median(latencies), 3) if latencies else None,
            "latency_max_seconds": round(max(latencies), 3) if latencies else None,
        },
    }


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# REST inference benchmark",
        "",
        f"`bench/bench_api.py`, {result['date']}, {result['machine']}, torch {result['torch']}. "
        f"Input: {result['volume']['description']} ({result['volume']['bytes'] / 1e6:.1f} MB .nii.gz). "
        f"Median of {result['configs'][0]['repeats']} interleaved repeats; load average "
        f"{result['load_average_before']} before, {result['load_average_after']} after (the machine is shared).",
        "",
        "| model | network input | forward (s) | in-process pipeline (s) | REST end-to-end (s)"
        " | REST / forward | REST / forward, fastest runs | REST / pipeline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result["configs"]:
        m = c["median_seconds"]
        lines.append(
            f"| {c['config']} ({c['parameters']:,} params, roi {c['roi_size'][0]})"
            f" | {'x'.join(map(str, c['network_input_shape']))} "
            f"@ {c['spacing_mm'][0]:g} mm | {m['forward']:.2f} | {m['pipeline']:.2f} | {m['rest']:.2f} | "
            f"**{c['ratio_rest_vs_forward']:.2f}** | {c['ratio_rest_vs_forward_min']:.2f}"
            f" | {c['ratio_rest_vs_inprocess_pipeline']:.2f} |"
        )
    lines += [
        "",
        "Against the yardsticks of issue 12 (same run, medians): fixed costs = the in-process pipeline minus its "
        "network forward; nibabel read = `np.asarray(nib.load(upload).dataobj)`; MONAI bundle = LoadImaged -> "
        "EnsureChannelFirstd -> Orientationd -> Spacingd -> SlidingWindowInferer (gaussian) -> softmax -> Invertd "
        "(probabilities) -> argmax -> SaveImaged, in process, same model:",
        "",
        "| model | REST / pipeline (goal <= 1.10) | fixed (s) | nibabel read (s) | fixed / read (goal <= 2)"
        " | MONAI bundle (s) | REST / MONAI bundle (goal <= 0.6) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["configs"]:
        m = c["median_seconds"]
        lines.append(
            f"| {c['config']} | **{c['ratio_rest_vs_inprocess_pipeline']:.2f}** | {c['median_fixed_seconds']:.3f}"
            f" | {m['read']:.3f} | **{c['ratio_fixed_vs_read']:.2f}** | {m['monai_bundle']:.2f}"
            f" | **{c['ratio_rest_vs_monai_bundle']:.2f}** |"
        )
    lines += [
        "",
        "The same in CPU seconds (all threads; the server process's CPU for REST), which background load "
        "distorts less than wall time:",
        "",
        "| model | forward CPU (s) | in-process pipeline CPU (s) | REST server CPU (s) | REST / forward (CPU) |",
        "|---|---|---|---|---|",
    ]
    for c in result["configs"]:
        m = c["median_cpu_seconds"]
        lines.append(
            f"| {c['config']} | {m['forward']:.2f} | {m['pipeline']:.2f}"
            f" | {m['rest']:.2f} | **{c['ratio_rest_vs_forward_cpu']:.2f}** |"
        )
    lines += [
        "",
        "Where the REST time goes (server-side medians, seconds):",
        "",
        "| model | " + " | ".join(result["configs"][0]["server_stage_median_seconds"]) + " |",
        "|---|" + "---|" * len(result["configs"][0]["server_stage_median_seconds"]),
    ]
    for c in result["configs"]:
        lines.append(
            f"| {c['config']} | " + " | ".join(f"{v:.3f}" for v in c["server_stage_median_seconds"].values()) + " |"
        )
    lines += [
        "",
        "Throughput with concurrent clients (each sends its requests back to back):",
        "",
        "| model | clients | requests | wall (s) | throughput (req/s) | sequential (req/s) | latency p50 / max (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["configs"]:
        k = c["concurrency"]
        if not k["clients"]:
            lines.append(f"| {c['config']} | not run (--quick) | | | | | |")
            continue
        lines.append(
            f"| {c['config']} | {k['clients']} | {k['requests']} | {k['wall_seconds']:.1f}"
            f" | {k['throughput_per_second']:.3f} | "
            f"{k['sequential_throughput_per_second']:.3f}"
            f" | {k['latency_p50_seconds']:.2f} / {k['latency_max_seconds']:.2f} |"
        )
    lines += [
        "",
        "*forward*: `shared.training.predict_logits` (MONAI sliding window) on the already preprocessed volume. "
        "*in-process pipeline*: the service's own work without HTTP (inflate and check the upload, RAS + Spacingd, "
        "forward, labels back to the 1 mm grid, encode .nii.gz). *REST*: client-side time from sending the "
        "upload to holding the whole returned label map.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="default,bigger", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--registry", type=Path, default=None, help="benchmark this registry's model instead")
    parser.add_argument("--model", default=None, help="version in --registry (default: the served one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 repeats, no concurrency run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads, in-process and server"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.clients = min(args.repeats, 2), 0
    torch.set_num_threads(args.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    configs = []
    with tempfile.TemporaryDirectory(prefix="fedmri-bench-api-") as tmp:
        work = Path(tmp)
        volume = make_volume(work)
        if args.registry is not None:
            from shared.registry import served_version

            version = args.model or served_version(args.registry)
            print(f"benchmarking {version} from {args.registry}", flush=True)
            configs.append(
                bench_config(
                    "registry",
                    args.registry,
                    version,
                    volume,
                    args.repeats,
                    args.clients,
                    args.requests_per_client,
                    args.threads,
                    work,
                )
            )
        else:
            for name in args.configs.split(","):
                mcfg, dcfg = CONFIGS[name]
                registry = work / f"registry-{name}"
                torch.manual_seed(0)
                save_model(registry, f"bench-{name}", build_unet(mcfg).state_dict(), mcfg, dcfg, kind="bench")
                mark_served(registry, f"bench-{name}")
                print(f"benchmarking {name} ...", flush=True)
                configs.append(
                    bench_config(
                        name,
                        registry,
                        f"bench-{name}",
                        volume,
                        args.repeats,
                        args.clients,
                        args.requests_per_client,
                        args.threads,
                        work,
                    )
                )
                print(json.dumps(configs[-1]["median_seconds"]), flush=True)
        shape = list(nib.load(volume).shape)
        volume_info = {
            "description": f"1 mm brain {'x'.join(map(str, shape))} float32",
            "shape": shape,
            "bytes": volume.stat().st_size,
        }
    result = {
        "benchmark": "REST /v1/segment vs in-process sliding-window forward (1 mm volume)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch threads",
        "torch": torch.__version__,
        "volume": volume_info,
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "goal": "REST / in-process pipeline <= 1.10; fixed costs / nibabel read <= 2; REST / MONAI bundle <= 0.6",
        "configs": configs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "api.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "api.md")
    print((args.out / "api.md").read_text())


if __name__ == "__main__":
    main()
