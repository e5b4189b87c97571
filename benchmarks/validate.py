"""Cost of Caliper validation per event: ``parse_envelope`` against ``orjson.loads`` alone.

Builds envelopes of ``--items`` items drawn (seeded) from the Caliper 1.2 fixture
mix, serialises them, and times each call on the raw bytes.  The cost per event
of one envelope is its time divided by its item count; the table gives the
median and p95 of that over every envelope and round, and events/s over the
whole run.  Two mixes: every fixture item (events and entity describes) and
events only.  Bounded by --rounds and --max-seconds.

    .venv/bin/python benchmarks/validate.py [--items 50] [--envelopes 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lap.caliper import CALIPER_V1P2, parse_envelope  # noqa: E402

DEFAULT_FIXTURES = ROOT / "tests" / "fixtures" / "caliper" / "v1p2"
TARGET_US = 30.0


def load_pool(folder: Path) -> tuple[list[dict], list[dict]]:
    """(every item, events only) from the fixture folder, envelopes unpacked."""
    items: list[dict] = []
    for path in sorted(folder.glob("caliper*.json")):
        if "EndpointConfig" in path.name:
            continue
        doc = orjson.loads(path.read_bytes())
        if path.name.startswith("caliperEnvelope"):
            items.extend(doc["data"])
        else:
            items.append(doc)
    events = [item for item in items if item["type"] == "Event" or item["type"].endswith("Event")]
    return items, events


def envelopes(pool: list[dict], count: int, size: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    bodies = []
    for n in range(count):
        data = [rng.choice(pool) for _ in range(size)]
        envelope = {
            "sensor": "https://example.edu/sensors/1",
            "sendTime": "2024-05-01T10:15:00.000Z",
            "dataVersion": CALIPER_V1P2,
            "data": data,
        }
        bodies.append(orjson.dumps(envelope))
    return bodies


def measure(fn, bodies: list[bytes], size: int, rounds: int, deadline: float) -> dict:
    for body in bodies[:20]:  # warm up
        fn(body)
    per_event: list[float] = []
    total_ns = 0
    total_events = 0
    clock = time.perf_counter_ns
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for body in bodies:
                start = clock()
                fn(body)
                elapsed = clock() - start
                per_event.append(elapsed / size / 1000)
                total_ns += elapsed
                total_events += size
            gc.collect()
            if time.monotonic() > deadline:
                break
    finally:
        if gc_was:
            gc.enable()
    per_event.sort()
    return {
        "median_us_per_event": round(statistics.median(per_event), 2),
        "p95_us_per_event": round(per_event[int(0.95 * (len(per_event) - 1))], 2),
        "events_per_s": round(total_events / (total_ns / 1e9)),
        "envelopes_timed": len(per_event),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES, help="folder of Caliper 1.2 fixtures")
    parser.add_argument("--items", type=int, default=50, help="items per envelope")
    parser.add_argument("--envelopes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=120)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "validate.json")
    args = parser.parse_args()

    if not args.fixtures.is_dir():
        print(f"fixture folder not found: {args.fixtures} (pass --fixtures)", file=sys.stderr)
        return 2
    everything, events = load_pool(args.fixtures)
    deadline = time.monotonic() + args.max_seconds
    results = []
    for mix, pool in (("fixture mix (events + entities)", everything), ("events only", events)):
        bodies = envelopes(pool, args.envelopes, args.items, args.seed)
        for body in bodies[:5]:
            parse_envelope(body)  # the mix must be valid, or the timing means nothing
        for name, fn in (("orjson.loads (baseline)", orjson.loads), ("parse_envelope", parse_envelope)):
            row = {"mix": mix, "function": name, **measure(fn, bodies, args.items, args.rounds, deadline)}
            results.append(row)

    header = f"{'mix':34} {'function':26} {'median µs/ev':>12} {'p95 µs/ev':>10} {'events/s':>10}"
    print(header)
    print("-" * len(header))
    for row in results:
        print(
            f"{row['mix']:34} {row['function']:26} {row['median_us_per_event']:>12.2f} "
            f"{row['p95_us_per_event']:>10.2f} {row['events_per_s']:>10,}"
        )
    mix_row = next(r for r in results if r["function"] == "parse_envelope")
    verdict = "within" if mix_row["median_us_per_event"] <= TARGET_US else "OVER"
    print(f"\nparse_envelope on the fixture mix: {mix_row['median_us_per_event']} µs/event median, "
          f"{verdict} the {TARGET_US:.0f} µs target")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "validate",
        "items_per_envelope": args.items,
        "envelopes": args.envelopes,
        "rounds": args.rounds,
        "target_median_us_per_event": TARGET_US,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "results": results,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2) + "\n")
    print(f"written {args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
