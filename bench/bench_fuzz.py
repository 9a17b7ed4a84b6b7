"""The long run of the API's property test: thousands of random header/body mutations of real NIfTI files.

CI runs ``tests/server/api/test_fuzz.py`` with a fixed, derandomized set of 100 examples; this runs
the same property with fresh random examples (``FEDMRI_FUZZ_RANDOM=1``) and many more of them.
Every answer must be 200 or a JSON 4xx, never 5xx, and the upload folder empty afterwards.

Run: .venv/bin/python bench/bench_fuzz.py [--examples 2000]  ->  bench/results/fuzz.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    args = parser.parse_args()
    env = {**os.environ, "FEDMRI_FUZZ_EXAMPLES": str(args.examples), "FEDMRI_FUZZ_RANDOM": "1"}
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.monotonic()
    command = [sys.executable, "-m", "pytest", "tests/server/api/test_fuzz.py", "-q", "-p", "no:cacheprovider",
               "--hypothesis-show-statistics"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "examples": args.examples,
        "passed": proc.returncode == 0,
        "wall_s": round(time.monotonic() - started, 1),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "pytest_tail": proc.stdout[-3000:],
    }
    if "= FAILURES =" in proc.stdout:  # the falsifying example and its reproduction blob
        failure = proc.stdout.split("= FAILURES =", 1)[1].split("warnings summary", 1)[0]
        result["failure"] = "\n".join(line for line in failure.splitlines() if "nvImageCodec" not in line)[-6000:]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuzz.json").write_text(json.dumps(result, indent=2) + "\n")
    print(proc.stdout[-3000:])
    print(f"fuzz_examples={args.examples} passed={result['passed']} wall_s={result['wall_s']}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
