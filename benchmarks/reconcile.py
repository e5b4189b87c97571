"""Reconcile on an hour of audit data at 10K events/s: the counts, and every event by id.

It starts its own LAP (`lap up --detach` on free ports in a temporary folder)
and writes, for one tenant, what an hour at --rate events/s on --shards shards
(one batch per shard per second) leaves behind:

- the minute counters (`stage_counts`: acknowledged, accepted, archived, aggregated);
- the manifest: a batch and an archive object row per shard and second, and
  the (empty) archive objects in the S3 stand-in, so that their listing is real;
- the receipt objects in the S3 stand-in, one per batch, --rate/--shards
  events each (36 million in all at the defaults).

Then it times, with the same Reconciler the Output API and `lap reconcile` use:

1. the counts of the hour (60 whole minutes: what `GET /v1/audit/reconcile`
   without ids does);
2. `detail=ids` over the hour: every receipt read and set against the batches,
   the archive objects and the index (empty here: every id is missing from it);
3. as the same-run baseline, reading the hour's receipt objects from the S3
   stand-in without decoding them.

    .venv/bin/python benchmarks/reconcile.py [--rate 10000] [--shards 4] [--minutes 60]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import sys
import time
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine, own_lap, write_report  # noqa: E402

TENANT = "bench"
TARGETS = {"counts_s": 1.0, "ids_s": 120.0}
# an hour inside the dedup window (24 h): reconcile looks at single events of such hours only
HOUR = (datetime.now(timezone.utc) - timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)


def receipt_object(shard: str, second: int, per_batch: int, first: int) -> bytes:
    """A consumer's receipt object for one batch: `per_batch` events in 10-event records."""
    start_us = int((HOUR + timedelta(seconds=second)).timestamp() * 1e6)
    records = (per_batch + 9) // 10
    noise = os.urandom(16 * per_batch).hex()  # random ids, as sensors' UUIDs are: they do not compress
    ids = [f"urn:uuid:{noise[k:k + 8]}-{noise[k + 8:k + 12]}-4{noise[k + 13:k + 16]}-8{noise[k + 17:k + 20]}-"
           f"{noise[k + 20:k + 32]}" for k in range(0, 32 * per_batch, 32)]
    doc = {"format": 1, "tenant": TENANT, "shard": shard, "first_seq": str(first), "last_seq": str(first + records - 1),
           "seqs": [str(first + r) for r in range(records)], "requests": ["r"], "sensors": ["s"],
           "event_id": ids,
           "record": [i // 10 for i in range(per_batch)], "position": [i % 10 for i in range(per_batch)],
           "received_us": [start_us + i * 1_000_000 // per_batch for i in range(per_batch)],
           "request": [0] * per_batch, "sensor": [0] * per_batch, "describe": [0] * per_batch,
           "duplicate": [0] * per_batch, "forwarded": [0] * per_batch, "relayed": [0] * per_batch}
    return gzip.compress(orjson.dumps(doc), compresslevel=1)


async def fill(settings, rate: int, shards: int, minutes: int) -> dict:
    from lap.audit.receipts import receipt_key
    from lap.aws import open_client
    from lap.sinks.archive import archive_key
    from lap.sinks.store import connect

    per_batch = rate // shards
    seconds = minutes * 60
    stream = settings.stream.name
    started = time.monotonic()
    conn = await connect(settings)
    try:
        await conn.execute(
            """INSERT INTO stage_counts (tenant, sensor, shard_id, received_minute, stage, events)
               SELECT $1, 's', 'shard-' || sh, $2::timestamptz + m * interval '1 minute', st, $3 * 60
                 FROM generate_series(0, $4 - 1) m, generate_series(0, $5 - 1) sh,
                      unnest(ARRAY['acknowledged', 'accepted', 'archived', 'aggregated']) st""",
            TENANT, HOUR, per_batch, minutes, shards)
        rows = await conn.fetch(
            """INSERT INTO batches (stream, shard_id, first_seq, last_seq, records, events, describes, duplicates)
               SELECT $1, 'shard-' || sh, s::bigint * 1000000, s::bigint * 1000000 + $2 - 1, $2, $3, 0, 0
                 FROM generate_series(0, $4 - 1) s, generate_series(0, $5 - 1) sh
               RETURNING id, shard_id, first_seq""", stream, (per_batch + 9) // 10, per_batch, seconds, shards)
        objects = []
        for r in rows:
            first = int(r["first_seq"])
            key = archive_key(settings, TENANT, HOUR, r["shard_id"], first, first + (per_batch + 9) // 10 - 1)
            objects.append((key, r["id"], r["shard_id"], first))
        await conn.copy_records_to_table(
            "archive_objects", columns=("key", "batch_id", "tenant", "received_hour", "records", "bytes"),
            records=[(k, b, TENANT, HOUR, per_batch, 1000) for k, b, _, _ in objects])
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    async with AsyncExitStack() as stack:
        s3 = await open_client(stack, settings, "s3")
        sem = asyncio.Semaphore(16)

        async def put(key: str, body: bytes) -> None:
            async with sem:
                await s3.put_object(Bucket=settings.archive.bucket, Key=key, Body=body)

        receipts_bytes = 0
        for chunk in range(0, len(objects), 256):
            puts = []
            for key, _, shard, first in objects[chunk:chunk + 256]:
                second = first // 1_000_000
                minute = second // 60
                body = receipt_object(shard, second, per_batch, first)
                receipts_bytes += len(body)
                last = first + (per_batch + 9) // 10 - 1
                puts.append(put(receipt_key(settings.archive.receipts_prefix, TENANT, HOUR, shard, first, last,
                                            (minute, minute)), body))
                puts.append(put(key, b""))
            await asyncio.gather(*puts)
            print(f"\r  filled {min(chunk + 256, len(objects)):,} of {len(objects):,} batches", end="",
                  file=sys.stderr, flush=True)
        print(file=sys.stderr)
    return {"fill_s": round(time.monotonic() - started, 1), "batches": len(objects),
            "events": per_batch * len(objects), "receipt_bytes_per_event": round(receipts_bytes / (per_batch * len(objects)), 1)}


async def measure(settings, minutes: int) -> dict:
    from lap.audit.receipts import hour_prefix
    from lap.audit.reconcile import Reconciler, Window
    from lap.aws import open_client
    from lap.sinks.index import open_opensearch
    from lap.sinks.store import create_pool

    async with AsyncExitStack() as stack:
        pool = await create_pool(settings)
        stack.push_async_callback(pool.close)
        s3 = await open_client(stack, settings, "s3")
        search = open_opensearch(settings)
        stack.push_async_callback(search.close)
        reconciler = Reconciler(settings, pool, s3, search)
        window = Window(TENANT, HOUR, HOUR + timedelta(minutes=minutes))

        t = time.monotonic()
        counts = await reconciler.run(window)
        counts_s = time.monotonic() - t

        # the baseline: the stand-in's own rate for the objects detail=ids reads
        t = time.monotonic()
        paginator = s3.get_paginator("list_objects_v2")
        keys = [o["Key"] async for page in paginator.paginate(
            Bucket=settings.archive.bucket, Prefix=hour_prefix(settings.archive.receipts_prefix, TENANT, HOUR))
            for o in page.get("Contents", [])]
        sem = asyncio.Semaphore(16)

        async def get(key: str) -> int:
            async with sem:
                reply = await s3.get_object(Bucket=settings.archive.bucket, Key=key)
                async with reply["Body"] as body:
                    return len(await body.read())

        raw_bytes = sum(await asyncio.gather(*(get(k) for k in keys)))
        raw_s = time.monotonic() - t

        t = time.monotonic()
        ids = await reconciler.run(window, with_ids=True, limit=1000)
        ids_s = time.monotonic() - t
    return {"counts_s": round(counts_s, 3), "counts": counts.as_dict(), "ids_s": round(ids_s, 1),
            "ids": ids.as_dict() | {"missing_ids": {k: len(v) for k, v in (ids.missing_ids or {}).items()}},
            "raw_read_s": round(raw_s, 1), "raw_objects": len(keys), "raw_bytes": raw_bytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/reconcile.json"))
    args = parser.parse_args()
    if not (1 <= args.minutes <= 60 and args.shards >= 1 and args.rate >= args.shards):
        parser.error("--minutes 1..60, --shards >= 1 and --rate >= --shards")

    with own_lap("reconcile", process={"index_enabled": False}) as (config, settings):
        print(f"writing an hour of audit data at {args.rate:,} events/s...", file=sys.stderr, flush=True)
        filled = asyncio.run(fill(settings, args.rate, args.shards, args.minutes))
        print("reconciling...", file=sys.stderr, flush=True)
        measured = asyncio.run(measure(settings, args.minutes))

    events = filled["events"]
    report = {"benchmark": "reconcile", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "config": vars(args) | {"json": str(args.json)}, "fill": filled, **measured,
              "ids_us_per_event": round(measured["ids_s"] / events * 1e6, 2)}
    rows = [
        ("events in the hour", f"{events:,}", ""),
        ("counts of the hour (s)", f"{measured['counts_s']}", f"< {TARGETS['counts_s']}"),
        ("detail=ids over the hour (s)", f"{measured['ids_s']}", f"< {TARGETS['ids_s']}"),
        ("  per event (µs)", f"{report['ids_us_per_event']}", ""),
        ("baseline: reading the receipt objects (s)", f"{measured['raw_read_s']}",
         f"{measured['raw_objects']:,} objects"),
        ("receipt bytes per event (gzip)", f"{filled['receipt_bytes_per_event']}", ""),
        ("figures agree (accepted, aggregated)",
         f"{measured['counts']['accepted'] == measured['ids']['accepted'] == events}, "
         f"{measured['counts']['aggregated'] == measured['ids']['aggregated'] == events}", ""),
    ]
    print()
    for name, value, target in rows:
        print(f"{name:<44} {value:>16}   {target}")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
