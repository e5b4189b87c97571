"""How long `lap up` takes to answer 200 on /healthz, and `lap down` to leave nothing.

Runs `lap up --detach` twice on free ports in a temporary folder: first with an
empty data folder (initdb, stream and bucket creation), then again on the same
data (the everyday restart). Each run is bounded by --timeout.

    .venv/bin/python benchmarks/startup.py [--runs 2] [--json benchmarks/results/startup.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import lap, machine, write_config  # noqa: E402


def healthz_ok(port: int) -> bool:
    """/healthz answers 200 (it asks every dependency, which on a busy 2-core box takes seconds)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            return reply.status == 200
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="1 cold start, then warm starts")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/startup.json"))
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="lap-bench-"))
    config = write_config(folder)
    http_port = yaml.safe_load(config.read_text())["ray"]["http_port"]
    rows = []
    try:
        for run in range(args.runs):
            kind = "cold (empty data)" if run == 0 else "warm (existing data)"
            print(f"run {run + 1}/{args.runs}: {kind} ...", file=sys.stderr, flush=True)
            start = time.monotonic()
            up = lap("up", "--detach", config=config, timeout=args.timeout)
            up_s = time.monotonic() - start
            # `lap up --detach` returned on a 200; right after it, a check of a dependency may still time out
            # on this busy box, so it is asked again for up to 30 s
            answered = any(healthz_ok(http_port) or time.sleep(1) for _ in range(30))
            if up.returncode != 0 or not answered:
                print(up.stdout, up.stderr, f"exit {up.returncode}; /healthz 200 afterwards: {answered}",
                      file=sys.stderr)
                return 1
            start = time.monotonic()
            down = lap("down", config=config, timeout=args.timeout)
            down_s = time.monotonic() - start
            left = healthz_ok(http_port)
            rows.append({"run": kind, "up_to_healthz_200_s": round(up_s, 1),
                         "down_s": round(down_s, 1), "api_still_answering": left, "down_rc": down.returncode})
    finally:
        lap("down", config=config, timeout=args.timeout)
        shutil.rmtree(folder, ignore_errors=True)

    print(f"\n{'run':<22} {'up -> /healthz 200 (s)':>22} {'down (s)':>9}")
    for r in rows:
        print(f"{r['run']:<22} {r['up_to_healthz_200_s']:>22.1f} {r['down_s']:>9.1f}")
    result = {"benchmark": "startup", "machine": machine(),
              "runs": rows, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")
    return 0 if all(not r["api_still_answering"] and r["down_rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
