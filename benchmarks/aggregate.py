"""Per-learner aggregation of one batch: the numpy path against the plain Python loop.

For each batch size (default 10K and 100K events of ``lap.samples.EventFactory``,
wrapped into stream records as ingest writes them, plus one entity record per
50 events and a few events without a course), it times, best of --repeats (5):

- ``aggregate_python(records)``: the dict loop, the baseline;
- ``columns_from_records(records)``: the one per-record Python pass;
- ``aggregate(columns)``: the vectorised grouping, including turning the result
  into the Python column lists that go to asyncpg as arrays;

and reports events/s for each, the speed-up of ``aggregate`` and of the whole
numpy path (columns + aggregate) over the loop. Two shapes of batch, because
the cost of the output rows depends on how many events share a
(learner, course, day): "spread" is the factory's default (1,000 learners,
50 courses, 30 days: about one event per learner-course-day), "one day" is
1,000 learners in 10 courses on one day (about ten per learner-course-day at
100K). The garbage collector is frozen after the batches are built, so its
walks over the benchmark's own records are not timed.

    .venv/bin/python benchmarks/aggregate.py [--sizes 10000 100000] [--repeats 3] [--json benchmarks/results/aggregate.json]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine, write_report  # noqa: E402

from lap.caliper import iri_of  # noqa: E402
from lap.process.aggregate import aggregate, aggregate_python, columns_from_records  # noqa: E402
from lap.samples import EventFactory  # noqa: E402

TARGETS = {"speedup": 20.0, "events_per_s": 1_000_000}
SHAPES = {
    "spread": {"learners": 1000, "courses": 50, "days": 30},
    "one day": {"learners": 1000, "courses": 10, "days": 1},
}


def records(events: int, shape: dict, seed: int) -> list[dict]:
    """Stream records as ingest writes them: meta with the resolved learner and course, and the item."""
    rng = random.Random(seed)
    batch = []
    for n, item in enumerate(EventFactory(seed=seed, **shape).events(events)):
        if rng.random() < 0.05:
            item.pop("group")
        learner = iri_of(item["actor"])
        if item["type"] == "GradeEvent" and iri_of(item["object"].get("assignee")):
            learner = iri_of(item["object"]["assignee"])
        meta = {"event_id": item["id"], "kind": "event", "type": item["type"], "action": item["action"],
                "tenant": "default", "sensor": "https://lms.example.edu/sensors/lms",
                "received_at": item["eventTime"], "learner": learner, "course": iri_of(item.get("group")),
                "event_time": item["eventTime"]}
        batch.append({"meta": meta, "item": item})
        if n % 50 == 0:
            doc = {"id": f"https://lms.example.edu/docs/{n}", "type": "Document", "name": "Reading"}
            batch.append({"meta": {"event_id": doc["id"], "kind": "entity", "type": "Document", "action": None,
                                   "tenant": "default", "sensor": meta["sensor"], "received_at": meta["received_at"],
                                   "learner": None, "course": None, "event_time": None}, "item": doc})
    return batch


def best(fn: Callable, arg, repeats: int) -> tuple[float, object]:
    fastest, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(arg)
        fastest = min(fastest, time.perf_counter() - start)
    return fastest, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="events per batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "aggregate.json")
    args = parser.parse_args()

    batches = [(name, size, records(size, shape, args.seed)) for name, shape in SHAPES.items() for size in args.sizes]
    gc.collect()
    gc.freeze()
    results = []
    for name, size, batch in batches:
        python_s, expected = best(aggregate_python, batch, args.repeats)
        columns_s, columns = best(columns_from_records, batch, args.repeats)
        aggregate_s, got = best(aggregate, columns, args.repeats)
        if got.normalized() != expected.normalized():  # a fast wrong answer is no result
            print(f"{name} {size}: aggregate() differs from aggregate_python()", file=sys.stderr)
            return 1
        results.append({
            "shape": name, "events": size, "records": len(batch), "learner_day_rows": len(got.learner_days["tenant"]),
            "python_s": round(python_s, 4), "columns_s": round(columns_s, 4), "aggregate_s": round(aggregate_s, 4),
            "python_events_per_s": round(size / python_s), "columns_events_per_s": round(size / columns_s),
            "aggregate_events_per_s": round(size / aggregate_s),
            "speedup_aggregate": round(python_s / aggregate_s, 1),
            "speedup_end_to_end": round(python_s / (columns_s + aggregate_s), 1),
        })

    header = (f"{'shape':8} {'events':>7} {'rows':>6} {'python ev/s':>12} {'columns ev/s':>13} "
              f"{'aggregate ev/s':>15} {'agg x':>6} {'e2e x':>6}  target (agg >= 1,000,000 ev/s, >= 20x)")
    print(header)
    print("-" * len(header))
    for r in results:
        met = r["aggregate_events_per_s"] >= TARGETS["events_per_s"] and r["speedup_aggregate"] >= TARGETS["speedup"]
        print(f"{r['shape']:8} {r['events']:>7,} {r['learner_day_rows']:>6,} {r['python_events_per_s']:>12,} "
              f"{r['columns_events_per_s']:>13,} {r['aggregate_events_per_s']:>15,} {r['speedup_aggregate']:>6} "
              f"{r['speedup_end_to_end']:>6}  {'met' if met else 'MISSED'}")
    print("rows: learner-day rows out; agg x: aggregate() over aggregate_python(); "
          "e2e x: columns_from_records() + aggregate() over aggregate_python()")

    write_report(args.json, {
        "benchmark": "aggregate",
        "repeats": args.repeats,
        "shapes": SHAPES,
        "targets": TARGETS,
        "machine": machine(),
        "results": results,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
