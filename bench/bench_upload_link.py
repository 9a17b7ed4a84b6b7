"""REST latency after the last byte of a 1 mm upload sent over a throttled link, this checkout vs a baseline commit.

On loopback a 30 MB upload arrives in ~0.03 s, so inflating it while it arrives
(``server/api/upload.py``) cannot show; a hospital's link takes 0.3 s (100 MB/s) or more,
and the inflate (~0.1 s) can then finish before the last byte does. This serves the same
registry model from this checkout and from a ``git worktree`` of ``--baseline``, alternating
server starts, and times from the client's last byte to the whole response.

Run: .venv/bin/python bench/bench_upload_link.py --registry runs/registry --baseline 4cf0015
  -> bench/results/upload_link.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
RESULTS = REPO / "bench" / "results"
BOUNDARY = "uploadlinkboundary"


def serve(checkout: Path, registry: Path) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "FEDMRI_TORCH_THREADS": "2", "PYTHONPATH": str(checkout)}
    code = "import sys; from server.cli import main; sys.argv[0] = 'fedmri'; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--registry", str(registry)], cwd=checkout, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server from {checkout} not ready")


def after_last_byte(url: str, body: bytes, rate: float, chunk: int = 256 * 1024) -> float:
    """Seconds from the client's last body byte to the whole response, the body paced at ``rate`` bytes/s."""
    last: list[float] = []

    def paced():
        start = time.perf_counter()
        for i in range(0, len(body), chunk):
            while time.perf_counter() < start + i / rate:
                time.sleep(0.001)
            yield body[i:i + chunk]
        last.append(time.perf_counter())

    response = httpx.post(url + "/v1/segment", content=paced(), timeout=300,
                          headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    end = time.perf_counter()
    if response.status_code != 200:
        raise RuntimeError(f"POST /v1/segment: {response.status_code} {response.text[:200]}")
    return end - last[0]


def main() -> int:
    from bench_api import make_volume

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--registry", type=Path, default=REPO / "runs" / "registry")
    p.add_argument("--baseline", default="4cf0015", help="commit before inflate-while-receiving")
    p.add_argument("--rate-mb-s", type=float, default=100.0)
    p.add_argument("--pairs", type=int, default=4, help="alternating server starts per checkout")
    p.add_argument("--repeats", type=int, default=6, help="timed uploads per server start (after one warm-up)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    times: dict[str, list[float]] = {"this checkout": [], f"baseline {args.baseline}": []}
    with tempfile.TemporaryDirectory(prefix="fedmri-bench-link-") as tmp:
        work = Path(tmp)
        data = make_volume(work).read_bytes()
        body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"v.nii.gz\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
        baseline = work / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
                       check=True, capture_output=True)
        try:
            checkouts = {"this checkout": REPO, f"baseline {args.baseline}": baseline}
            for _ in range(args.pairs):
                for name, checkout in checkouts.items():
                    proc, url = serve(checkout, args.registry)
                    try:
                        after_last_byte(url, body, args.rate_mb_s * 1e6)  # warm-up
                        times[name] += [after_last_byte(url, body, args.rate_mb_s * 1e6) for _ in range(args.repeats)]
                    finally:
                        proc.terminate()
                        proc.wait()
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], check=False)
    new, old = times["this checkout"], times[f"baseline {args.baseline}"]
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(old, k=len(old))) - statistics.median(rng.choices(new, k=len(new)))
                  for _ in range(5000))
    result = {
        "benchmark": "REST seconds after the last upload byte, 1 mm .nii.gz at a paced rate",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "rate_mb_s": args.rate_mb_s,
        "upload_bytes": len(data),
        "registry_model": str(args.registry),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "median_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "baseline_minus_this_median_s": round(statistics.median(old) - statistics.median(new), 4),
        "bootstrap_95ci_s": [round(boot[int(0.025 * len(boot))], 4), round(boot[int(0.975 * len(boot))], 4)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "upload_link.json").write_text(json.dumps(result, indent=2) + "\n")
    md = (
        "# Upload over a paced link: inflating while receiving\n\n"
        f"`bench/bench_upload_link.py`, {result['date']}, {result['cpus']} CPUs; load average "
        f"{result['load_average_before']} before, {result['load_average_after']} after. "
        f"A {len(data) / 1e6:.1f} MB 1 mm .nii.gz sent at {args.rate_mb_s:g} MB/s; "
        "seconds from the client's last byte to the whole response, "
        f"{args.pairs} alternating server starts x {args.repeats} uploads per checkout, same model.\n\n"
        "| checkout | median (s) | n |\n|---|---|---|\n"
        + "".join(f"| {k} | {result['median_s'][k]:.3f} | {len(v)} |\n" for k, v in times.items())
        + f"\nBaseline minus this checkout: **{result['baseline_minus_this_median_s']:+.3f} s** "
        f"(bootstrap 95 % CI of the difference of medians [{result['bootstrap_95ci_s'][0]:+.3f}, "
        f"{result['bootstrap_95ci_s'][1]:+.3f}])"
        + (": no detectable difference.\n" if result["bootstrap_95ci_s"][0] <= 0 <= result["bootstrap_95ci_s"][1]
           else ".\n")
    )
    (args.out / "upload_link.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
