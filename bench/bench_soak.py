"""Load and soak: `fedmri serve` on a loopback port under 8 concurrent clients mixing good and bad uploads.

Kinds of request (shuffled with a fixed seed):
    valid       3 mm synthetic brain (.nii.gz)                                 -> 200
    recovered   same volume, qform quaternion broken (sform valid)             -> 200 + X-Input-Warnings
    invalid     junk bytes, truncated gzip, NaN qform and sform, 2-D image     -> 422
    oversized   48^3 declaring 24 mm voxels (work budget)                      -> 422 FEDMRI_MAX_MODEL_VOXELS
    too_big     an upload over FEDMRI_MAX_UPLOAD_BYTES                         -> 413

Checks: no 5xx; server RSS after the run within 10 % of its value after the warm-up; p50/p95
latency per kind. The server trims its heap after every request here (``FEDMRI_HEAP_RETAIN_MIB=0``;
the default keeps up to 256 MiB of freed memory for the next request), so memory kept on purpose
can neither hide a leak nor look like one. Bounded: --requests (default 320) and --max-seconds (default 900). The load
average is recorded before and after (the machine is shared).

Run: .venv/bin/python bench/bench_soak.py  ->  bench/results/soak.{json,md}; prints soak_p95_s=...
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import random
import socket
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

from shared.data import DataConfig
from shared.model import ModelConfig, build_unet
from shared.registry import mark_served, save_model
from shared.scanner import ScannerProfile, apply_scanner
from shared.synth import synthesize_subject

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
UPLOAD_LIMIT = 4 * 1024**2
MIX = {"valid": 0.40, "recovered": 0.10, "invalid": 0.20, "oversized": 0.15, "too_big": 0.15}
EXPECTED = {"valid": 200, "recovered": 200, "invalid": 422, "oversized": 422, "too_big": 413}


def _nifti(data: np.ndarray, affine: np.ndarray, gz: bool = True) -> bytes:
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1) if gz else raw


def _with_header(content: bytes, **fields) -> bytes:
    raw = bytearray(gzip.decompress(content))
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])))
    for name, value in fields.items():
        hdr[name] = value
    raw[:348] = hdr.binaryblock
    return gzip.compress(bytes(raw), compresslevel=1)


def make_payloads() -> dict[str, list[bytes]]:
    subject = synthesize_subject(seed=3, resolution=3, lesion_probability=1.0)
    scanner = ScannerProfile(scale=4.0, shift=-300.0, noise_std=0.01, spacing=(3.0, 3.0, 3.0))
    image = apply_scanner(subject.signal, scanner, np.random.default_rng(3)).astype(np.float32)
    valid = _nifti(image, subject.affine)
    coarse = np.random.default_rng(0).normal(100, 5, (48, 48, 48)).astype(np.float32)
    return {
        "valid": [valid],
        "recovered": [_with_header(valid, quatern_b=0.9, quatern_c=0.9)],
        "invalid": [os.urandom(20_000), valid[: len(valid) // 3],
                    _with_header(valid, quatern_d=float("nan"), srow_x=[float("nan")] * 4),
                    _nifti(image[:, :, 0].copy(), subject.affine)],
        "oversized": [_nifti(coarse, np.diag([24.0, 24.0, 24.0, 1.0]))],
        "too_big": [os.urandom(UPLOAD_LIMIT + 100_000)],
    }


def make_registry(root: Path) -> Path:
    """An untrained small model (the tests' 3-level UNet at 4 mm, 32^3 windows).

    The soak is about the service staying up and bounded, not about throughput (``bench_api.py``
    measures the default model); a small model keeps 300+ requests within minutes on a shared
    2-core machine. Timings do not depend on the weights.
    """
    registry = root / "registry"
    torch.manual_seed(0)
    mcfg = ModelConfig(channels=(8, 16, 32), strides=(2, 2))
    dcfg = DataConfig(spacing=(4.0, 4.0, 4.0), roi_size=(32, 32, 32))
    save_model(registry, "soak", build_unet(mcfg).state_dict(), mcfg, dcfg, kind="pooled", strategy="none",
               norm="instance")
    mark_served(registry, "soak")
    return registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def start_server(registry: Path, work: Path, threads: int) -> tuple[subprocess.Popen, str, Path]:
    port, log = free_port(), work / "server.log"
    uploads = work / "uploads"
    uploads.mkdir()
    env = {**os.environ, "FEDMRI_UPLOAD_DIR": str(uploads), "FEDMRI_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
           "FEDMRI_TORCH_THREADS": str(threads), "FEDMRI_MAX_CONCURRENT_INFERENCES": "2",
           "FEDMRI_MAX_QUEUED_REQUESTS": "8", "FEDMRI_HEAP_RETAIN_MIB": "0"}  # leak check: see the docstring
    env.pop("FEDMRI_API_KEY", None)
    with log.open("w") as fh:
        command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--registry", str(registry), "--log-level", "warning"]
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
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
    raise RuntimeError("server not ready after 180 s")


def run_clients(url: str, schedule: list[tuple[str, bytes]], clients: int, deadline: float) -> list[dict]:
    """``clients`` threads, each with its own keep-alive connection, work through ``schedule``."""
    results: list[dict] = []
    lock, position = threading.Lock(), [0]

    def worker() -> None:
        with httpx.Client(timeout=600) as client:
            while time.monotonic() < deadline:
                with lock:
                    if position[0] >= len(schedule):
                        return
                    kind, content = schedule[position[0]]
                    position[0] += 1
                start = time.perf_counter()
                try:
                    r = client.post(url + "/v1/segment", files={"file": ("volume.nii.gz", content)})
                    status, warned = r.status_code, "x-input-warnings" in r.headers
                    json_body = r.headers.get("content-type") == "application/json"
                except httpx.TransportError as exc:  # e.g. a reset while sending a refused too-big body
                    status, warned, json_body = f"transport:{type(exc).__name__}", False, False
                results.append({"kind": kind, "status": status, "seconds": time.perf_counter() - start,
                                "warned": warned, "json": json_body})

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(results: list[dict]) -> dict:
    kinds = {}
    for kind in MIX:
        rows = [r for r in results if r["kind"] == kind]
        seconds = [r["seconds"] for r in rows]
        statuses: dict[str, int] = {}
        for r in rows:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        kinds[kind] = {"requests": len(rows), "statuses": statuses, "expected": EXPECTED[kind],
                       "as_expected": sum(r["status"] == EXPECTED[kind] for r in rows),
                       "p50_s": round(percentile(seconds, 50), 3), "p95_s": round(percentile(seconds, 95), 3),
                       "max_s": round(max(seconds), 3) if seconds else None}
    return kinds


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Soak: 8 concurrent clients, valid + invalid + oversized uploads",
        "",
        f"{result['requests']} requests in {result['wall_s']:.0f} s from {result['clients']} clients against "
        "`fedmri serve` on loopback (untrained 3-level UNet at 4 mm with 32^3 windows, 3 mm brain uploads, "
        f"2 inferences at once, {result['torch_threads']} torch thread(s) each); "
        f"load average {result['load_average_before']} before, {result['load_average_after']} after "
        f"({result['cpu_count']} CPUs, shared with other work).",
        "",
        "| kind | requests | expected | as expected | other answers | p50 s | p95 s | max s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, k in result["kinds"].items():
        other = {s: n for s, n in k["statuses"].items() if s != str(k["expected"])}
        lines.append(f"| {kind} | {k['requests']} | {k['expected']} | {k['as_expected']} | {other or '-'} | "
                     f"{k['p50_s']} | {k['p95_s']} | {k['max_s']} |")
    rss = result["rss"]
    lines += [
        "",
        f"- 5xx answers: **{result['server_errors']}**; all 4xx JSON: {result['all_4xx_json']}; "
        f"recovered uploads answered with X-Input-Warnings: {result['recovered_warned']}",
        f"- overall latency p50 {result['p50_s']:.2f} s, **p95 {result['soak_p95_s']:.2f} s**",
        f"- server RSS after warm-up {rss['after_warmup_mib']:.0f} MiB, after the run {rss['after_run_mib']:.0f} MiB "
        f"(ratio **{rss['ratio']:.3f}**, goal within 10 %; heap trimmed after every request for this leak check); "
        f"peak sampled {rss['peak_mib']:.0f} MiB",
        f"- upload folder empty afterwards: {result['uploads_empty']}; "
        f"stopped by the time bound: {result['stopped_by_time_bound']}",
        "",
        f"Run: `.venv/bin/python bench/bench_soak.py` ({result['date']}).",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per inference")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    load_before = [round(x, 2) for x in os.getloadavg()]
    payloads = make_payloads()
    rng = random.Random(0)
    kinds = list(MIX)

    def schedule(n: int) -> list[tuple[str, bytes]]:
        chosen = rng.choices(kinds, weights=[MIX[k] for k in kinds], k=n)
        return [(k, rng.choice(payloads[k])) for k in chosen]

    with tempfile.TemporaryDirectory(prefix="fedmri-soak-") as tmp:
        work = Path(tmp)
        proc, url, log = start_server(make_registry(work), work, args.threads)
        try:
            warm = [(k, p) for k in kinds for p in payloads[k]] * 2
            warm += schedule(max(args.warmup - len(warm), 0))
            run_clients(url, warm, args.clients, time.monotonic() + args.max_seconds)
            time.sleep(1.0)
            rss_warm = rss_bytes(proc.pid)
            peak, sampling = [rss_warm], threading.Event()

            def sample() -> None:
                while not sampling.wait(0.5):
                    peak.append(rss_bytes(proc.pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.monotonic()
            deadline = started + args.max_seconds
            results = run_clients(url, schedule(args.requests), args.clients, deadline)
            wall = time.monotonic() - started
            sampling.set()
            sampler.join()
            time.sleep(1.0)
            rss_after = rss_bytes(proc.pid)
            uploads_empty = not any((work / "uploads").iterdir())
            healthy = httpx.get(url + "/healthz", timeout=10).status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        server_log = log.read_text()

    seconds = [r["seconds"] for r in results]
    server_errors = sum(isinstance(r["status"], int) and r["status"] >= 500 for r in results)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "clients": args.clients,
        "requests": len(results),
        "requests_planned": args.requests,
        "stopped_by_time_bound": len(results) < args.requests,
        "wall_s": round(wall, 1),
        "kinds": summarize(results),
        "server_errors": server_errors,
        "all_4xx_json": all(r["json"] for r in results if isinstance(r["status"], int) and 400 <= r["status"] < 500),
        "recovered_warned": all(r["warned"] for r in results if r["kind"] == "recovered" and r["status"] == 200),
        "p50_s": round(percentile(seconds, 50), 3),
        "soak_p95_s": round(percentile(seconds, 95), 3),
        "rss": {"after_warmup_mib": rss_warm / 1024**2, "after_run_mib": rss_after / 1024**2,
                "ratio": round(rss_after / rss_warm, 4), "peak_mib": max(peak) / 1024**2,
                "samples_mib_every_10s": [round(v / 1024**2) for v in peak[::20]]},
        "uploads_empty": uploads_empty,
        "healthy_after": healthy,
        "tracebacks_in_server_log": server_log.count("Traceback"),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "soak.md")
    print(json.dumps({k: v for k, v in result.items() if k != "kinds"}, indent=2))
    for kind, k in result["kinds"].items():
        print(f"{kind:10s} n={k['requests']:3d} statuses={k['statuses']} p50={k['p50_s']}s p95={k['p95_s']}s")
    print(f"soak_p95_s={result['soak_p95_s']}")
    ok = server_errors == 0 and abs(result["rss"]["ratio"] - 1) <= 0.10 and uploads_empty and healthy
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
