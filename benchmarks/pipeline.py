"""End to end on the local stack: a sustained load through /caliper, the time until it is all processed, and
what the database keeps per event.

It starts its own LAP (`lap up --detach` on free ports in a temporary folder),
with the index writer off, and:

1. raw: the Kinesis stand-in's own read rate, GetRecords of LAP's records on
   one shard (the ceiling the consumers share), in a stream of its own;
2. load: envelopes of 50 generated events offered at --rate events/s (open
   loop, from a separate process) for --seconds; then it waits until every
   accepted event is archived and aggregated (the committed `stage_counts`),
   sampling the consumers' lag and the RSS of the stack once a second, and
   reads the CPU of each kind of process from /proc;
3. database: a course of --course-events generated events (500 learners, 20
   courses, a week) plus 5% of its envelopes sent twice, for a tenant of its
   own; the growth of the database's relations over it, per event;
4. index phase: starts the IndexWriter (as the Pipeline deployment would) for
   --index-seconds and reports the documents it indexed per second and their
   average size.

The index runs on its own so that the processing figures are the consumers'
alone; benchmarks/box.py runs everything at once.

    .venv/bin/python benchmarks/pipeline.py [--rate 5000] [--seconds 60] [--index-seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import lap, machine, own_lap, write_report  # noqa: E402
from ingest import load_process, pct  # noqa: E402

TARGETS = {"processed_per_s": 5_000, "drain_s": 15, "consumer_cpu_us": 50, "postgres_cpu_us": 20,
           "db_bytes_per_event": 30, "doc_bytes": 400}


def _kind(proc: psutil.Process) -> str:
    text = " ".join(proc.cmdline()) or proc.name()
    for needle, kind in (("kinesalite", "kinesis"), ("s3rver", "s3"), ("org.opensearch.bootstrap.OpenSearch", "opensearch"),
                         ("postgres", "postgres"), ("ServeReplica:ingest", "ingest replicas"),
                         ("ShardConsumer", "shard consumers"), ("IndexWriter", "index writer"),
                         ("ProxyActor", "serve proxy")):
        if needle in text:
            return kind
    return "other (Ray, supervisor)"


def cpu_by_kind(supervisor: int) -> dict[str, float]:
    """CPU seconds so far of every process of the stack, by kind."""
    totals: dict[str, float] = {}
    try:
        procs = [psutil.Process(supervisor), *psutil.Process(supervisor).children(recursive=True)]
    except psutil.Error:
        return totals
    for proc in procs:
        try:
            times = proc.cpu_times()
            kind = _kind(proc)
        except psutil.Error:
            continue
        totals[kind] = totals.get(kind, 0.0) + times.user + times.system
    return totals


def stack_rss(supervisor: int) -> int:
    """Resident bytes of the supervisor and everything under it (stand-ins, Ray and its workers)."""
    total = 0
    try:
        procs = [psutil.Process(supervisor), *psutil.Process(supervisor).children(recursive=True)]
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


async def read_progress(settings) -> tuple[dict[str, int], int | None]:
    from lap.sinks.store import connect

    conn = await connect(settings)
    try:
        stages = {r["stage"]: int(r["n"]) for r in await conn.fetch(
            "SELECT stage, sum(events) AS n FROM stage_counts GROUP BY stage")}
        lag = await conn.fetchval("SELECT max(lag_ms) FROM shard_status")
    finally:
        await conn.close()
    return stages, lag


AGGREGATES = ("learner_days", "learner_day_actions", "course_days", "course_hours")


async def database_bytes(settings) -> dict[str, int]:
    """Bytes of every table of the database (with its indexes and TOAST), and rows of the aggregate tables."""
    from lap.sinks.store import connect

    conn = await connect(settings)
    try:
        await conn.execute("CHECKPOINT")
        sizes = {r["relname"]: int(r["n"]) for r in await conn.fetch(
            "SELECT c.relname, pg_total_relation_size(c.oid) AS n FROM pg_class c "
            "JOIN pg_namespace ns ON ns.oid = c.relnamespace WHERE ns.nspname = 'public' AND c.relkind = 'r'")}
        for table in AGGREGATES:
            sizes[f"{table}.rows"] = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
        return sizes
    finally:
        await conn.close()


async def raw_read_rate(settings, seconds: float = 5.0) -> dict:
    """GetRecords of LAP's records straight from the stand-in, one shard, 200 records a call (the consumers'
    page), from a stream of its own filled first."""
    from contextlib import AsyncExitStack
    from datetime import datetime, timezone

    from ingest import Bodies

    from lap.auth import Principal
    from lap.aws import open_client
    from lap.caliper import parse_envelope
    from lap.ingest.records import pack
    from lap.stream.kinesis import ensure_stream
    from lap.stream.records_client import RecordsClient
    from lap.stream.shard_map import ShardMap

    name = f"{settings.stream.name}-bench-read"
    raw = settings.model_copy(update={"stream": settings.stream.model_copy(update={"name": name, "shards": 1})})
    async with AsyncExitStack() as stack:
        kinesis = await open_client(stack, raw, "kinesis")
        await ensure_stream(kinesis, raw)
        client = RecordsClient(raw)
        try:
            shards = ShardMap(await client.list_shards(StreamName=name))
            bodies = Bodies(50, seed=5)
            principal = Principal("bench", "bench", "sensor", None)
            records = []
            for _ in range(2000):
                parsed = parse_envelope(bodies.next())
                for r in pack(parsed, principal, datetime.now(timezone.utc), "r", shards, 1 << 20).records:
                    records.append({"Data": r.data, "PartitionKey": r.partition_key, "events": len(parsed.items)})
            for start in range(0, len(records), 100):
                await client.put_records(StreamName=name, Records=records[start:start + 100])
            shard = shards.shard_ids[0]
            iterator = (await kinesis.get_shard_iterator(StreamName=name, ShardId=shard,
                                                         ShardIteratorType="TRIM_HORIZON"))["ShardIterator"]
            read = 0
            started = time.monotonic()
            while time.monotonic() - started < seconds and iterator:
                reply = await client.get_records(iterator, 200)
                iterator = reply.get("NextShardIterator")
                read += len(reply["Records"])
                if not reply["Records"]:
                    break
            elapsed = time.monotonic() - started
        finally:
            await client.close()
            await kinesis.delete_stream(StreamName=name)
    return {"records_per_s": round(read / elapsed), "events_per_s": round(read / elapsed * 50)}


def run_phase(settings, supervisor: int, token: str, rate: float, seconds: float, per: int, drain_timeout: float,
              samples: list[dict], baseline: dict[str, int]) -> dict:
    """Offer `rate` events/s for `seconds`, then wait until the stage counts show everything processed."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    loader = multiprocessing.Process(target=load_process, args=(
        f"{settings.api_url}/caliper", token, rate, seconds, 32, per, queue, True))
    started = time.monotonic()
    cpu_before = cpu_by_kind(supervisor)
    loader.start()
    load_result = load_ended = drained_at = None
    cpu_after: dict[str, float] = {}
    while True:
        stages, lag = asyncio.run(read_progress(settings))
        stages = {k: v - baseline.get(k, 0) for k, v in stages.items()}
        now = time.monotonic()
        samples.append({"t": round(now - started, 1), "stages": stages, "lag_ms": lag, "rss": stack_rss(supervisor)})
        if load_result is None and not queue.empty():
            load_result = queue.get()
            loader.join(30)
            load_ended = now
        if load_result is not None:
            expected = load_result["statuses"].get(200, 0) * per
            accepted = stages.get("accepted", 0)
            if accepted >= expected and stages.get("archived", 0) + stages.get("duplicates", 0) >= accepted \
                    and stages.get("aggregated", 0) + stages.get("duplicates", 0) >= accepted:
                drained_at = now
                cpu_after = cpu_by_kind(supervisor)
                break
            if now - load_ended > drain_timeout:
                break
        time.sleep(1.0)
    processed = samples[-1]["stages"].get("aggregated", 0)
    return {"load": load_result, "started": started, "load_ended": load_ended, "drained_at": drained_at,
            "processed": processed,
            "cpu_us_per_event": {k: round((v - cpu_before.get(k, 0.0)) / processed * 1e6, 1)
                                 for k, v in sorted(cpu_after.items())} if processed and cpu_after else {}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5000, help="events/s offered (open loop)")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--events-per-envelope", type=int, default=50)
    parser.add_argument("--course-events", type=int, default=20_000, help="the database phase's course")
    parser.add_argument("--index-seconds", type=float, default=20, help="how long the index phase runs")
    parser.add_argument("--drain-timeout", type=float, default=600)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/pipeline.json"))
    args = parser.parse_args()
    if args.rate <= 0 or args.seconds <= 0 or args.rate * args.seconds > 2_000_000:
        parser.error("--rate and --seconds must be positive, and offer at most 2,000,000 events")

    samples: list[dict] = []
    with own_lap("pipeline", process={"index_enabled": False}) as (config, settings):
        token = lap("keys", "create", "--tenant", "bench", "--role", "sensor", config=config).stdout.strip()
        course_token = lap("keys", "create", "--tenant", "course", "--role", "sensor", config=config).stdout.strip()
        dense_token = lap("keys", "create", "--tenant", "dense", "--role", "sensor", config=config).stdout.strip()
        state = json.loads((settings.run_dir / "state.json").read_text())
        supervisor = state["pid"]
        print("raw stream read rate...", file=sys.stderr, flush=True)
        raw = asyncio.run(raw_read_rate(settings))
        print(f"load: {args.rate:,.0f} events/s for {args.seconds:.0f} s, then drain...", file=sys.stderr, flush=True)
        run = run_phase(settings, supervisor, token, args.rate, args.seconds, args.events_per_envelope,
                        args.drain_timeout, samples, {})
        print(f"database: a course of {args.course_events:,} events...", file=sys.stderr, flush=True)
        course = database_phase(settings, course_token, args.course_events, learners=500, courses=20, days=7)
        print(f"database: a dense course of {args.course_events:,} events (50 per learner-day)...", file=sys.stderr,
              flush=True)
        dense = database_phase(settings, dense_token, args.course_events, learners=max(1, args.course_events // 50),
                               courses=1, days=1)
        index = index_phase(settings, state["ray_address"], args.index_seconds)

    load_result = run["load"]
    ok = load_result["statuses"].get(200, 0)
    events = ok * args.events_per_envelope
    processed = run["processed"]
    drained_at, load_ended, started = run["drained_at"], run["load_ended"], run["started"]
    drain_s = (drained_at - load_ended) if drained_at else None
    # processed per second: everything committed, over the time from the first request to the drain
    total_s = (drained_at - started) if drained_at else None
    lat = load_result["latencies"]
    cpu = run["cpu_us_per_event"]
    report = {
        "benchmark": "pipeline",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {"rate": args.rate, "seconds": args.seconds, "events_per_envelope": args.events_per_envelope,
                   "course_events": args.course_events, "index_seconds": args.index_seconds},
        "raw_stream_read": raw,
        "accepted_events": events,
        "accepted_per_s": round(events / load_result["elapsed"]),
        "ingest_p99_ms": round(pct(lat, 0.99) * 1000, 1),
        "errors": sum(n for s, n in load_result["statuses"].items() if s != 200),
        "processed_events": processed,
        "processed_per_s": round(processed / total_s) if total_s else None,
        "max_lag_ms": max((s["lag_ms"] or 0) for s in samples),
        "drain_s": round(drain_s, 1) if drain_s is not None else None,
        "peak_rss_gb": round(max(s["rss"] for s in samples) / 2**30, 2),
        "duplicates": samples[-1]["stages"].get("duplicates", 0),
        "cpu_us_per_event": cpu,
        "database": course,
        "database_dense": dense,
        "index": index,
    }
    rows = [
        ("raw stand-in read rate, one shard (events/s)", f"{raw['events_per_s']:,}", ""),
        ("events accepted", f"{events:,}", ""),
        ("accepted/s (during the load)", f"{report['accepted_per_s']:,}", ""),
        ("processed/s (archived + aggregated)", f"{report['processed_per_s']}", f">= {TARGETS['processed_per_s']:,}"),
        ("max consumer lag (ms)", f"{report['max_lag_ms']:,}", ""),
        ("drain after the load stops (s)", f"{report['drain_s']}", f"<= {TARGETS['drain_s']}"),
        ("CPU µs/event, shard consumers", f"{cpu.get('shard consumers')}", f"<= {TARGETS['consumer_cpu_us']}"),
        ("CPU µs/event, Postgres", f"{cpu.get('postgres')}", f"<= {TARGETS['postgres_cpu_us']}"),
        ("database growth per event (course)", f"{course['bytes_per_event']}", f"<= {TARGETS['db_bytes_per_event']}"),
        ("  of which aggregates / the rest", f"{course['aggregate_bytes_per_event']} / "
                                            f"{course['other_bytes_per_event']}", ""),
        ("  learner-days in the course / bytes each", f"{course['learner_day_rows']:,} / "
                                                     f"{course['bytes_per_learner_day']:,}", ""),
        ("database growth per event (dense: 50/learner-day)", f"{dense['bytes_per_event']}", ""),
        ("peak RSS of the stack (GB)", f"{report['peak_rss_gb']}", ""),
        ("ingest p99 (ms) / errors", f"{report['ingest_p99_ms']} / {report['errors']}", ""),
        ("index docs/s (own phase)", f"{index.get('docs_per_s')}", ""),
        ("index document bytes (average)", f"{index.get('doc_bytes')}", f"<= {TARGETS['doc_bytes']}"),
    ]
    print()
    for name, value, target in rows:
        print(f"{name:<46} {value:>14}   {target}")
    print("\nCPU µs per event, by process: " + ", ".join(
        f"{k} {v}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])))
    write_report(args.json, report | {"samples": samples})
    return 0 if drained_at else 1


def database_phase(settings, token: str, count: int, learners: int, courses: int, days: int) -> dict:
    """A generated course (and 5% of its envelopes twice): how much the database grew per event.

    Aggregates are rows per learner, course and day, so their bytes per event
    depend on how many events share a learner-day: the spread course (about one
    each) is the worst case, the dense one (50 each) a busy course day.
    """
    import httpx
    import orjson

    from lap.samples import EventFactory, envelope

    events = EventFactory(seed=11, learners=learners, courses=courses, days=days).events(count)
    bodies = [orjson.dumps(envelope(events[i:i + 50])) for i in range(0, count, 50)]
    bodies += bodies[::20]
    before = asyncio.run(database_bytes(settings))
    baseline = asyncio.run(read_progress(settings))[0]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with httpx.Client(timeout=60) as client:
        for body in bodies:
            reply = client.post(f"{settings.api_url}/caliper", content=body, headers=headers)
            reply.raise_for_status()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        stages = asyncio.run(read_progress(settings))[0]
        if stages.get("aggregated", 0) - baseline.get("aggregated", 0) >= count:
            break
        time.sleep(1)
    after = asyncio.run(database_bytes(settings))
    grown = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    tables = {k: v for k, v in grown.items() if not k.endswith(".rows")}
    total = sum(tables.values())
    aggregates = sum(tables.get(t, 0) for t in AGGREGATES)
    return {"events": count, "copies": len(bodies) * 50, "bytes": total,
            "bytes_per_event": round(total / count, 1),
            "aggregate_bytes_per_event": round(aggregates / count, 1),
            "other_bytes_per_event": round((total - aggregates) / count, 1),
            "learner_day_rows": grown.get("learner_days.rows", 0),
            "bytes_per_learner_day": round(aggregates / max(1, grown.get("learner_days.rows", 0)), 1),
            "by_table_bytes_per_event": {k: round(v / count, 1) for k, v in sorted(tables.items(), key=lambda x: -x[1])
                                         if v}}


def index_phase(settings, ray_address: str, seconds: float) -> dict:
    """Run the IndexWriter for `seconds` over what was archived; documents indexed per second."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the local Ray's node is 127.0.0.1 (README)
    import ray

    from lap.audit.actor import NAMESPACE
    from lap.process.index_writer import INDEX_WRITER, IndexWriter

    ray.init(address=ray_address, namespace=NAMESPACE, log_to_driver=False)
    try:
        before = asyncio.run(read_progress(settings))[0].get("indexed", 0)
        writer = IndexWriter.options(name=INDEX_WRITER, lifetime="detached", get_if_exists=True).remote()
        writer.run.remote()
        print(f"index phase for {seconds:.0f} s...", file=sys.stderr, flush=True)
        time.sleep(seconds)
        after = asyncio.run(read_progress(settings))[0].get("indexed", 0)
        ray.kill(writer, no_restart=True)
        doc_bytes = asyncio.run(document_bytes(settings))
    finally:
        ray.shutdown()
    return {"seconds": seconds, "docs": after - before, "docs_per_s": round((after - before) / seconds),
            "doc_bytes": doc_bytes}


async def document_bytes(settings) -> float | None:
    """Average size of an indexed document's JSON source, over a sample of 1,000."""
    import orjson

    from lap.sinks.index import open_opensearch

    search = open_opensearch(settings)
    try:
        reply = await search.search(index=f"{settings.index.index_prefix}-*", body={"size": 1000},
                                    ignore_unavailable=True)
    finally:
        await search.close()
    hits = reply.get("hits", {}).get("hits", [])
    return round(sum(len(orjson.dumps(h["_source"])) for h in hits) / len(hits), 1) if hits else None


if __name__ == "__main__":
    sys.exit(main())
