"""Reconcile on a day of audit data at 10K events/s: how long the counts take, and what single events cost.

It starts its own LAP (`lap up --detach` on free ports in a temporary folder)
and writes synthetic audit rows for one tenant straight into Postgres (server
side, with generate_series), shaped like a day at --rate events/s on --shards
shards with one batch per shard per second:

- the minute counters (`stage_counts`) of the day;
- the manifest: a batch and an archive object row per shard and second
  (345,600 for 4 shards), and --hours-in-s3 hours of those objects put into
  the S3 stand-in, so that the listing is measured for real;
- --events receipts and dedup rows in one extra hour, for the per-event path.

Then it times:

0. the coordinator's periodic archive check over the day (the listing of the
   objects that exist; the others are recorded as lost);
1. `counts` over the whole day (1,440 whole minutes; what `GET /v1/audit/reconcile`
   without ids does), and over 00:30 to 23:30 (whole minutes that cut the
   first and last hours, whose lost objects are counted from their batches);
2. the per-event path over the extra hour (what the partial edge minutes of a
   window and `detail=ids` cost), in µs per event;
3. one S3 listing page of 1,000 keys.

The day's S3 listing is then computed from the measured page time, and says so.

    .venv/bin/python benchmarks/reconcile.py [--rate 10000] [--shards 4] [--events 1000000] [--hours-in-s3 1]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import lap, machine, start_lap, write_private_config, write_report  # noqa: E402

TENANT = "bench"
# a day inside the dedup window (7 days): reconcile looks at single events of such days only
DAY = (datetime.now(timezone.utc) - timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0)


async def fill(settings, rate: int, shards: int, events: int, hours_in_s3: int) -> dict:
    from lap.aws import open_client
    from lap.sinks.store import connect

    per_minute = rate * 60
    conn = await connect(settings)
    started = time.monotonic()
    try:
        await conn.execute(
            """INSERT INTO stage_counts (tenant, sensor, shard_id, received_minute, stage, events)
               SELECT $1, 's', 'shard-' || sh, $2::timestamptz + m * interval '1 minute', st, $3 / $4
                 FROM generate_series(0, 1439) m, generate_series(0, $4 - 1) sh,
                      unnest(ARRAY['accepted', 'archived', 'aggregated']) st""", TENANT, DAY, per_minute, shards)
        await conn.execute(
            """INSERT INTO batches (stream, shard_id, first_seq, last_seq, records, events, describes, duplicates)
               SELECT 'bench', 'shard-' || sh, s::bigint * 100000, s::bigint * 100000 + 99999, $1 / $2, $1 / $2, 0, 0
                 FROM generate_series(0, 86399) s, generate_series(0, $2 - 1) sh""", rate, shards)
        await conn.execute(
            """INSERT INTO archive_objects (key, batch_id, tenant, received_hour, records, bytes)
               SELECT 'archive/v1/tenant=bench/date=' || $3::text || '/hour=' || lpad(div(b.first_seq, 360000000)::text, 2, '0')
                      || '/shard=' || b.shard_id || '/' || b.first_seq || '-' || b.last_seq || '.jsonl.gz',
                      b.id, $1, $2::timestamptz + div(b.first_seq, 360000000)::int * interval '1 hour',
                      b.records, 1000
                 FROM batches b WHERE b.stream = 'bench'""", TENANT, DAY, f"{DAY:%Y-%m-%d}")
        # one more hour of single events: receipts and their dedup rows
        extra = DAY + timedelta(days=1)
        await conn.execute(
            """INSERT INTO receipts (event_id, tenant, sensor, shard_id, sequence_number, received_at, request_id, kind)
               SELECT 'urn:uuid:' || md5(i::text), $1, 's', 'shard-' || (i % $3), i,
                      $2::timestamptz + (i % 3600000) * interval '1 millisecond', 'r', 'event'
                 FROM generate_series(1, $4) i""", TENANT, extra, shards, events)
        await conn.execute(
            """INSERT INTO seen_events (tenant, event_id, received_at, batch_id, shard_id, sequence_number)
               SELECT tenant, event_id, received_at, 1, shard_id, sequence_number FROM receipts WHERE tenant = $1""",
            TENANT)
        await conn.execute("ANALYZE")
        keys = [r["key"] for r in await conn.fetch(
            "SELECT key FROM archive_objects WHERE tenant = $1 AND received_hour < $2 ORDER BY key",
            TENANT, DAY + timedelta(hours=hours_in_s3))]
    finally:
        await conn.close()
    async with AsyncExitStack() as stack:
        s3 = await open_client(stack, settings, "s3")
        sem = asyncio.Semaphore(16)

        async def put(key: str) -> None:
            async with sem:
                await s3.put_object(Bucket=settings.archive.bucket, Key=key, Body=b"")

        await asyncio.gather(*(put(k) for k in keys))
    return {"fill_s": round(time.monotonic() - started, 1), "objects_in_s3": len(keys)}


async def measure(settings, events: int, hours_in_s3: int) -> dict:
    from lap.audit.reconcile import Reconciler, Window
    from lap.aws import open_client
    from lap.sinks.archive import check_archive
    from lap.sinks.index import open_opensearch
    from lap.sinks.store import create_pool

    async with AsyncExitStack() as stack:
        pool = await create_pool(settings)
        stack.push_async_callback(pool.close)
        s3 = await open_client(stack, settings, "s3")
        search = open_opensearch(settings)
        stack.push_async_callback(search.close)
        reconciler = Reconciler(settings, pool, s3, search)

        # 0. the coordinator's periodic archive check over the day (lists the hours' prefixes)
        started = time.monotonic()
        lost = await check_archive(settings, pool, s3, DAY)
        check_s = time.monotonic() - started

        # 1. the day from the counters and the recorded lost objects
        started = time.monotonic()
        day = await reconciler.counts(Window(TENANT, DAY, DAY + timedelta(days=1)))
        counts_s = time.monotonic() - started
        started = time.monotonic()
        cut = await reconciler.counts(Window(TENANT, DAY + timedelta(minutes=30), DAY + timedelta(hours=23.5)))
        cut_counts_s = time.monotonic() - started

        # 2. single events: the extra hour, per event
        extra = DAY + timedelta(days=1)
        started = time.monotonic()
        exact = await reconciler.exact(Window(TENANT, extra, extra + timedelta(hours=1)), False, 0, {})
        exact_s = time.monotonic() - started

        # the audit trail's bytes per event: receipts and dedup rows, with their indexes
        async with pool.acquire() as conn:
            sizes = {t: await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", t)
                     for t in ("receipts", "seen_events")}

        # 3. one listing page of 1,000 keys
        prefix = f"archive/v1/tenant=bench/date={DAY:%Y-%m-%d}/hour=00/"
        started = time.monotonic()
        page = await s3.list_objects_v2(Bucket=settings.archive.bucket, Prefix=prefix, MaxKeys=1000)
        page_s = time.monotonic() - started
    return {
        "day_counts_s": round(counts_s, 2), "day_accepted": day.accepted,
        "cut_day_counts_s": round(cut_counts_s, 2), "cut_day_accepted": cut.accepted,
        "archive_check_s": round(check_s, 2), "archive_check_lost": lost,
        "exact_events": exact.accepted, "exact_s": round(exact_s, 2),
        "exact_us_per_event": round(exact_s / max(exact.accepted, 1) * 1e6, 2),
        "list_page_keys": page.get("KeyCount", 0), "list_page_s": round(page_s, 3),
        "bytes_per_event": {t: round(n / max(events, 1)) for t, n in sizes.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--events", type=int, default=1_000_000, help="single events for the per-event path")
    parser.add_argument("--hours-in-s3", type=int, default=1, help="hours of archive objects put into S3")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/reconcile.json"))
    args = parser.parse_args()

    from lap.settings import load_settings

    folder = Path(tempfile.mkdtemp(prefix="lap-bench-reconcile-"))
    config = write_private_config(folder, process={"index_enabled": False})
    settings = load_settings(config)
    if not start_lap(config):
        return 1
    try:
        print("writing a day of audit rows...", file=sys.stderr, flush=True)
        filled = asyncio.run(fill(settings, args.rate, args.shards, args.events, args.hours_in_s3))
        print("reconciling...", file=sys.stderr, flush=True)
        measured = asyncio.run(measure(settings, args.events, args.hours_in_s3))
    finally:
        lap("down", config=config)
        shutil.rmtree(folder, ignore_errors=True)

    objects_per_day = 86_400 * args.shards
    listing_day_s = objects_per_day / 1000 * measured["list_page_s"]
    edge_minute_s = args.rate * 60 * measured["exact_us_per_event"] / 1e6
    report = {"benchmark": "reconcile", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "config": vars(args) | {"json": str(args.json)}, **filled, **measured,
              "computed": {"listing_a_day_s": round(listing_day_s, 1), "one_edge_minute_s": round(edge_minute_s, 1)}}
    rows = [
        ("day's counts (1,440 whole minutes)", f"{measured['day_counts_s']} s",
         f"{measured['day_accepted']:,} events"),
        ("00:30-23:30 counts (hours cut at both ends)", f"{measured['cut_day_counts_s']} s",
         f"{measured['cut_day_accepted']:,} events"),
        ("periodic archive check of the day", f"{measured['archive_check_s']} s",
         f"{filled['objects_in_s3']:,} objects listed, {measured['archive_check_lost']:,} recorded lost"),
        ("per-event path", f"{measured['exact_us_per_event']} µs/event",
         f"{measured['exact_events']:,} events in {measured['exact_s']} s"),
        ("S3 listing page", f"{measured['list_page_s']} s", f"{measured['list_page_keys']} keys"),
        ("audit rows per event (receipts, dedup)",
         f"{measured['bytes_per_event']['receipts']} + {measured['bytes_per_event']['seen_events']} B",
         "tables and their indexes"),
        ("computed: the check listing a whole day's objects", f"{listing_day_s:.1f} s",
         f"{objects_per_day:,} objects"),
        ("computed: one partial edge minute at the rate", f"{edge_minute_s:.1f} s", f"{args.rate * 60:,} events"),
    ]
    print()
    for name, value, note in rows:
        print(f"{name:<52} {value:>16}   {note}")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
