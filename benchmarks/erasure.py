"""What erasing one learner costs in a tenant that took a day of 10K events/s, and what deleting a tenant costs.

It starts its own LAP (`lap up --detach` on free ports in a temporary folder)
and writes, for one tenant, the manifest a day at --rate events/s on --shards
shards leaves (a batch and an archive object row per shard and second, each
row with the hashes of --learners-per-object learners), and in the S3
stand-in the objects that hold the erased learner: --learner-events of them,
one of the learner's events in each, among --rate/--shards other events
(real archive lines, gzip JSON). The learner's aggregate rows and counters
are written to match. Then it times, with the Eraser the API and `lap erase`
use:

1. the erasure of the learner: finding its objects among the day's rows,
   rewriting them, the index, the aggregates;
   and, within it, the tenant's --refusals kept refusals (quarantined
   requests of about 3 KB, --refusals-naming of them naming the learner),
   read only where their hashes may name the learner;
2. the deletion of a tenant whose archive holds --tenant-objects objects (and
   as many receipt objects), from listing to the last row.

The baseline of the same run: the S3 stand-in's own rate for reading and
writing such objects.

    .venv/bin/python benchmarks/erasure.py [--hours 24] [--rate 10000] [--shards 4] [--learner-events 200]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine, own_lap, write_report  # noqa: E402

TENANT = "bench-erase"
LEAVING = "bench-leaving"
LEARNER = "https://lms.example.edu/users/erased-learner"
DAY = (datetime.now(timezone.utc) - timedelta(hours=30)).replace(minute=0, second=0, microsecond=0)


def line(tenant: str, learner: str, n: int, received: datetime, shard: str) -> bytes:
    """An archive line as a consumer writes it (meta first), ~1.1 KB like the generated events."""
    event_id = f"urn:uuid:{random.getrandbits(128):032x}"
    meta = {"tenant": tenant, "event_id": event_id, "kind": "event", "type": "NavigationEvent",
            "action": "NavigatedTo", "learner": learner, "course": "https://lms.example.edu/courses/c1",
            "event_time": received.isoformat().replace("+00:00", "Z"),
            "received_at": received.isoformat().replace("+00:00", "Z"), "sensor": "https://lms.example.edu/sensor",
            "key_id": "k", "request_id": f"r{n}", "shard_id": shard, "sequence_number": str(n), "position": 0,
            "actor": learner, "object": f"https://lms.example.edu/pages/{n % 500}"}
    item = {"@context": "http://purl.imsglobal.org/ctx/caliper/v1p2", "id": event_id, "type": "NavigationEvent",
            "actor": {"id": learner, "type": "Person"}, "action": "NavigatedTo",
            "object": {"id": meta["object"], "type": "WebPage", "name": "A page " * 20},
            "eventTime": meta["event_time"], "edApp": {"id": "https://lms.example.edu", "type": "SoftwareApplication"},
            "group": {"id": meta["course"], "type": "CourseOffering"},
            "session": {"id": f"https://lms.example.edu/sessions/{n % 977}", "type": "Session"}}
    return b'{"meta":' + orjson.dumps(meta) + b',"item":' + orjson.dumps(item) + b"}"


async def fill(settings, args) -> dict:
    from lap.aws import open_client
    from lap.sinks.archive import archive_key, learner_hash32, pack_lines, put_object
    from lap.sinks.store import connect

    started = time.monotonic()
    per_batch = args.rate // args.shards
    seconds = args.hours * 3600
    target = learner_hash32(LEARNER)
    conn = await connect(settings)
    try:
        await conn.execute("INSERT INTO tenants (name) VALUES ($1), ($2)", TENANT, LEAVING)
        rows = await conn.fetch(
            """INSERT INTO batches (stream, shard_id, first_seq, last_seq, records, events, describes, duplicates)
               SELECT $1, 'shard-' || sh, s::bigint * 1000000, s::bigint * 1000000 + 1, 2, $2, 0, 0
                 FROM generate_series(0, $3 - 1) s, generate_series(0, $4 - 1) sh
               RETURNING id, shard_id, first_seq""", settings.stream.name, per_batch, seconds, args.shards)
        holding = set(random.sample(range(len(rows)), args.learner_events))
        manifest, theirs = [], []
        for i, r in enumerate(rows):
            first = int(r["first_seq"])
            hour = DAY + timedelta(hours=(first // 1_000_000) // 3600)
            key = archive_key(settings, TENANT, hour, r["shard_id"], first, first + 1)
            learners = [random.getrandbits(32) - (1 << 31) for _ in range(args.learners_per_object)]
            if i in holding:
                learners[0] = target
                theirs.append((key, r["shard_id"], first, hour))
            manifest.append((key, r["id"], TENANT, hour, per_batch, 300_000, sorted(learners)))
            if len(manifest) == 20_000 or i == len(rows) - 1:
                await conn.copy_records_to_table(
                    "archive_objects", records=manifest,
                    columns=("key", "batch_id", "tenant", "received_hour", "records", "bytes", "learners"))
                manifest = []
                print(f"\r  manifest: {i + 1:,} of {len(rows):,} objects", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        await conn.execute(
            """INSERT INTO learner_days (tenant, learner, course, day, events, submissions, score_count, score_sum,
                                         max_score_sum, time_on_task_s, first_active, last_active)
               VALUES ($1, $2, 'https://lms.example.edu/courses/c1', $3, $4, 0, 0, 0, 0, 0, $5, $5)""",
            TENANT, LEARNER, DAY.date(), args.learner_events, DAY)
        await conn.execute("ANALYZE archive_objects")
    finally:
        await conn.close()
    async with AsyncExitStack() as stack:
        s3 = await open_client(stack, settings, "s3")
        gate = asyncio.Semaphore(8)
        written = 0
        t = time.monotonic()

        async def write(key: str, shard: str, first: int, hour: datetime) -> int:
            received = hour + timedelta(seconds=(first // 1_000_000) % 3600)
            lines = [line(TENANT, f"https://lms.example.edu/users/u{random.randrange(50_000)}", n, received, shard)
                     for n in range(per_batch - 1)]
            lines.insert(random.randrange(len(lines)), line(TENANT, LEARNER, per_batch, received, shard))
            body = pack_lines(lines)
            async with gate:
                await put_object(s3, settings, key, body)
            return len(body)

        sizes = []
        for chunk in range(0, len(theirs), 16):
            sizes += await asyncio.gather(*(write(*obj) for obj in theirs[chunk:chunk + 16]))
            written += len(theirs[chunk:chunk + 16])
            print(f"\r  the learner's objects: {written} of {len(theirs)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        put_s = time.monotonic() - t
        # the tenant to delete: empty archive objects and receipt objects, as reconcile.py's hour has
        t = time.monotonic()
        keys = []
        for n in range(args.tenant_objects):
            hour = DAY + timedelta(hours=n // (args.tenant_objects // 24 or 1) % 24)
            keys.append(archive_key(settings, LEAVING, hour, f"shard-{n % args.shards}", n * 2, n * 2 + 1))
            keys.append(f"{settings.archive.receipts_prefix}/tenant={LEAVING}/date={hour:%Y-%m-%d}/"
                        f"hour={hour:%H}/shard-{n % args.shards}/{n * 2}-{n * 2 + 1}.m00-59.json.gz")
        for chunk in range(0, len(keys), 256):
            await asyncio.gather(*(s3.put_object(Bucket=settings.archive.bucket, Key=k, Body=b"") for k in
                                   keys[chunk:chunk + 256]))
            print(f"\r  the leaving tenant's objects: {min(chunk + 256, len(keys)):,} of {len(keys):,}", end="",
                  file=sys.stderr, flush=True)
        print(file=sys.stderr)
        refusals_s = await fill_refusals(settings, s3, args)
    return {"fill_s": round(time.monotonic() - started, 1), "manifest_objects": len(rows),
            "refusals": args.refusals, "refusals_put_s": round(refusals_s, 1),
            "events_in_day": per_batch * len(rows), "learner_objects": len(theirs),
            "learner_object_bytes": round(sum(sizes) / len(sizes)), "learner_objects_put_s": round(put_s, 2),
            "tenant_objects": len(keys), "tenant_objects_put_s": round(time.monotonic() - t, 1)}


async def fill_refusals(settings, s3, args) -> float:
    """The tenant's kept refusals, as the ingest's quarantine writes them: a row and an object each, the payload an
    envelope of three events that failed validation; --refusals-naming of them name the learner."""
    from lap.ingest.quarantine import Quarantine, named_hashes
    from lap.sinks.store import connect

    t = time.monotonic()
    naming = set(random.sample(range(args.refusals), min(args.refusals_naming, args.refusals)))
    rows = []
    for chunk in range(0, args.refusals, 256):
        puts = []
        for n in range(chunk, min(chunk + 256, args.refusals)):
            received = DAY + timedelta(seconds=n * 86_400 // args.refusals)
            actors = [LEARNER if n in naming and i == 0 else f"https://lms.example.edu/users/u{random.randrange(50_000)}"
                      for i in range(3)]
            items = [orjson.loads(line(TENANT, actor, i, received, "shard-0"))["item"] | {"action": "NotAnAction"}
                     for i, actor in enumerate(actors)]
            payload = orjson.dumps({"sensor": "https://lms.example.edu/sensors/lms", "data": items}).decode()
            problems = [{"index": i, "path": f"$.data[{i}].action", "message": "unknown action NotAnAction"}
                        for i in range(3)]
            request_id = f"bench-{n:08d}"
            key = Quarantine.object_key(settings.archive.quarantine_prefix, TENANT, received, request_id)
            document = {"request_id": request_id, "tenant": TENANT, "sensor": "https://lms.example.edu/sensors/lms",
                        "received_at": received.isoformat(), "status": 400, "title": "Bad Request",
                        "problems": problems, "payload_bytes": len(payload), "payload_truncated": False,
                        "payload_encoding": "utf-8", "payload": payload}
            puts.append(s3.put_object(Bucket=settings.archive.bucket, Key=key, Body=orjson.dumps(document)))
            rows.append((request_id, TENANT, "https://lms.example.edu/sensors/lms", received, 400, "Bad Request",
                         orjson.dumps(problems).decode(), len(payload), key, named_hashes(payload.encode())))
        await asyncio.gather(*puts)
        print(f"\r  the tenant's kept refusals: {len(rows):,} of {args.refusals:,}", end="", file=sys.stderr,
              flush=True)
    print(file=sys.stderr)
    conn = await connect(settings)
    try:
        await conn.executemany(
            """INSERT INTO quarantined (request_id, tenant, sensor, received_at, status, title, problems, payload_bytes,
                                        object_key, learners)
               VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10)""", rows)
    finally:
        await conn.close()
    return time.monotonic() - t


async def measure(settings) -> dict:
    from lap.audit.erasure import Eraser, request_erasure, request_tenant_deletion
    from lap.aws import open_client
    from lap.sinks.archive import learner_hash32
    from lap.sinks.index import open_opensearch
    from lap.sinks.store import create_pool

    async with AsyncExitStack() as stack:
        pool = await create_pool(settings)
        stack.push_async_callback(pool.close)
        s3 = await open_client(stack, settings, "s3")
        search = open_opensearch(settings)
        stack.push_async_callback(search.close)
        steps: dict[str, list[float]] = {}  # step -> [first time it reported progress, last time, total]

        def progress(step: str, done: int, total: int) -> None:
            now = time.monotonic()
            steps.setdefault(step, [now, now, total])[1:] = [now, total]
            print(f"\r  {step}: {done:,} of {total:,}   ", end="", file=sys.stderr, flush=True)

        t = time.monotonic()
        async with pool.acquire() as conn:
            found = await conn.fetchval(
                "SELECT count(*) FROM archive_objects WHERE tenant = $1 AND $2 = ANY(learners)", TENANT,
                learner_hash32(LEARNER))
        scan_s = time.monotonic() - t
        t = time.monotonic()
        row, _ = await request_erasure(pool, TENANT, LEARNER, "benchmark")
        counts = await Eraser(settings, pool, s3, search, progress).run(row["id"])
        erase_s = time.monotonic() - t
        quarantine_s = steps["quarantine"][1] - steps["quarantine"][0]
        quarantine_read = int(steps["quarantine"][2])
        print(file=sys.stderr)
        t = time.monotonic()
        row, _ = await request_tenant_deletion(pool, LEAVING, "benchmark")
        deleted = await Eraser(settings, pool, s3, search, progress).run(row["id"])
        delete_s = time.monotonic() - t
        print(file=sys.stderr)
        # baseline: the stand-in reading one of the rewritten objects' size, as often as the erasure read them
        async with pool.acquire() as conn:
            keys = [r["new_key"] for r in await conn.fetch("SELECT new_key FROM erasure_objects WHERE new_key <> ''")]
        t = time.monotonic()
        gate = asyncio.Semaphore(8)

        async def read(key: str) -> int:
            async with gate:
                reply = await s3.get_object(Bucket=settings.archive.bucket, Key=key)
                async with reply["Body"] as body:
                    return len(await body.read())

        read_bytes = sum(await asyncio.gather(*(read(k) for k in keys)))
        read_s = time.monotonic() - t
        # baseline: reading every kept refusal, as an erasure would without the hashes
        async with pool.acquire() as conn:
            refusals = [r["object_key"] for r in await conn.fetch(
                "SELECT object_key FROM quarantined WHERE tenant = $1", TENANT)]
        t = time.monotonic()
        await asyncio.gather(*(read(k) for k in refusals))
        refusals_read_s = time.monotonic() - t
    return {"scan_s": round(scan_s, 2), "scan_found": found, "erase_s": round(erase_s, 2),
            "erase_quarantine_s": round(quarantine_s, 2), "erase_quarantine_read": quarantine_read,
            "erase_counts": counts,
            "delete_tenant_s": round(delete_s, 2), "delete_counts": deleted,
            "baseline_read_s": round(read_s, 2), "baseline_read_objects": len(keys), "baseline_read_bytes": read_bytes,
            "baseline_read_refusals_s": round(refusals_read_s, 2), "baseline_read_refusals": len(refusals)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--learners-per-object", type=int, default=100,
                        help="learner hashes in each archive object's manifest row")
    parser.add_argument("--learner-events", type=int, default=200, help="the erased learner's events in the day")
    parser.add_argument("--tenant-objects", type=int, default=14_400,
                        help="archive objects of the deleted tenant (and as many receipt objects)")
    parser.add_argument("--refusals", type=int, default=10_000, help="the tenant's kept refusals (quarantine)")
    parser.add_argument("--refusals-naming", type=int, default=10, help="of them, those naming the learner")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/erasure.json"))
    args = parser.parse_args()
    if not (1 <= args.refusals <= 1_000_000 and 0 <= args.refusals_naming <= args.refusals):
        parser.error("--refusals 1..1,000,000 and --refusals-naming at most --refusals")
    if not (1 <= args.hours <= 48 and args.shards >= 1 and args.rate >= args.shards
            and 1 <= args.learner_events <= args.hours * 3600 * args.shards and args.learners_per_object >= 1):
        parser.error("--hours 1..48, --shards >= 1, --rate >= --shards, --learner-events at most one per object")

    with own_lap("erasure", process={"index_enabled": False}) as (config, settings):
        print(f"writing a day's manifest at {args.rate:,} events/s...", file=sys.stderr, flush=True)
        filled = asyncio.run(fill(settings, args))
        print("erasing...", file=sys.stderr, flush=True)
        measured = asyncio.run(measure(settings))

    counts = measured["erase_counts"]
    report = {"benchmark": "erasure", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "config": vars(args) | {"json": str(args.json)}, "fill": filled, **measured}
    per_object = (measured["erase_s"] - measured["erase_quarantine_s"]) / max(1, counts.get("objects_rewritten", 0))
    rows = [
        ("events in the tenant's day", f"{filled['events_in_day']:,}", f"{filled['manifest_objects']:,} objects"),
        ("objects that may hold the learner (found by hash)", f"{measured['scan_found']:,}",
         f"in {measured['scan_s']} s"),
        ("erasing the learner (s)", f"{measured['erase_s']}", f"{per_object * 1000:.0f} ms per archive object"),
        ("  objects rewritten", f"{counts.get('objects_rewritten', 0):,}", ""),
        ("  events erased", f"{counts.get('events', 0):,}", f"{counts.get('receipts', 0):,} receipts"),
        ("  of it, the kept refusals (s)", f"{measured['erase_quarantine_s']}",
         f"{measured['erase_quarantine_read']:,} of {filled['refusals']:,} read by hash, "
         f"{counts.get('quarantined', 0)} named the learner"),
        ("baseline: reading the rewritten objects (s)", f"{measured['baseline_read_s']}",
         f"{measured['baseline_read_objects']:,} objects, {measured['baseline_read_bytes'] / 1e6:.0f} MB"),
        ("baseline: reading every kept refusal (s)", f"{measured['baseline_read_refusals_s']}",
         f"{measured['baseline_read_refusals']:,} refusals"),
        ("deleting a tenant (s)", f"{measured['delete_tenant_s']}",
         f"{filled['tenant_objects']:,} objects"),
    ]
    print()
    for name, value, note in rows:
        print(f"{name:<52} {value:>12}   {note}")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
