"""Stream processing end to end on the session's LAP: /caliper -> Kinesis -> consumers -> S3, Postgres, OpenSearch.

Each test sends its own tenant's events, so the checks (drained counts, exact
aggregates, each event exactly once in the committed archive) see only them.
Faults are real: a consumer actor killed through Ray, its worker process
SIGKILLed, OpenSearch frozen with SIGSTOP, a shard split in the stand-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import shutil
import signal
import time
import uuid
from datetime import datetime, timedelta, timezone
from contextlib import AsyncExitStack

import httpx
import orjson
import pytest

from lap.aws import open_client
from lap.process.aggregate import aggregate_python
from lap.process.coordinator import COORDINATOR, consumer_name
from lap.samples import envelope
from lap.sinks.index import index_name, open_opensearch
from lap.stream.shard_map import ShardMap
from tests.support.stack import run_lap
from tests.support.traffic import (
    archived_ids, assert_exact, consumer_pids, envelopes, expected_records, join_sender, make_events, new_tenant,
    open_shards, receipts_of, send, send_in_background, stage_totals, stored_aggregates, wait_for,
)

async def test_aggregates_are_exact_and_every_event_archived_once(lap_up, settings, db):
    tenant, token = new_tenant(lap_up)
    events = make_events(1500)
    describe = {"id": f"https://example.edu/users/describe-{uuid.uuid4().hex}", "type": "Person"}
    bodies = envelopes(events) + [orjson.dumps(envelope([describe]))]
    send(settings, token, bodies)
    totals = await wait_for(db, tenant, {"accepted": 1501, "archived": 1501, "aggregated": 1501})
    assert totals.get("describes") == 1 and totals.get("duplicates", 0) == 0
    # the describe is archived, but it is not an event: it adds to no aggregate
    stored = (await stored_aggregates(db, tenant)).normalized()
    assert sum(row[4] for row in stored["learner_days"]) == 1500
    ids = await archived_ids(settings, db, tenant)
    assert ids[describe["id"]] == 1
    del ids[describe["id"]]
    assert set(ids) == {e["id"] for e in events} and max(ids.values()) == 1
    expected = aggregate_python(expected_records(tenant, events)).normalized()
    assert stored == expected
    # each batch's manifest names its archive objects, and they all exist
    manifest = await db.fetchval(
        "SELECT count(*) FROM archive_objects o JOIN batches b ON b.id = o.batch_id WHERE o.tenant = $1", tenant)
    assert manifest >= 1


async def test_duplicates_are_counted_never_aggregated(lap_up, settings, db):
    tenant, token = new_tenant(lap_up)
    events = make_events(600)
    bodies = envelopes(events)
    send(settings, token, bodies)
    await wait_for(db, tenant, {"accepted": 600, "archived": 600, "aggregated": 600})
    before = (await stored_aggregates(db, tenant)).normalized()

    send(settings, token, bodies)  # a sensor retrying every envelope
    totals = await wait_for(db, tenant, {"accepted": 1200, "duplicates": 600})
    assert totals["archived"] == 600 and totals["aggregated"] == 600
    assert (await stored_aggregates(db, tenant)).normalized() == before
    await assert_exact(settings, db, tenant, events)


async def test_ray_kill_of_consumers_mid_run_loses_and_doubles_nothing(lap_up, settings, db, ray_driver):
    ray = ray_driver
    tenant, token = new_tenant(lap_up)
    events = make_events(3000, learners=300)
    shard_ids = [s["ShardId"] for s in await open_shards(settings)][:2]
    pids_before = consumer_pids(ray, shard_ids)
    sender = send_in_background(settings, token, envelopes(events), pause_s=0.05)
    await asyncio.sleep(1.5)
    for shard_id in shard_ids:
        ray.kill(ray.get_actor(consumer_name(shard_id)), no_restart=False)  # Ray restarts it
    join_sender(sender)
    await wait_for(db, tenant, {"accepted": 3000, "archived": 3000, "aggregated": 3000})
    pids_after = consumer_pids(ray, shard_ids)
    assert all(pids_after[s] != pids_before[s] for s in shard_ids), "the consumers were not restarted"
    await assert_exact(settings, db, tenant, events)


async def traffic_past_a_consumer(lap_up, settings, ray, count: int, learners: int):
    """A new tenant's `count` events sent in the background; (tenant, events, first open shard, its consumer's pid,
    the sender)."""
    tenant, token = new_tenant(lap_up)
    events = make_events(count, learners=learners)
    shard_id = (await open_shards(settings))[0]["ShardId"]
    pid = consumer_pids(ray, [shard_id])[shard_id]
    return tenant, events, shard_id, pid, send_in_background(settings, token, envelopes(events), pause_s=0.05)


async def test_sigkill_of_a_consumer_process_mid_run(lap_up, settings, db, ray_driver):
    ray = ray_driver
    tenant, events, shard_id, pid, sender = await traffic_past_a_consumer(lap_up, settings, ray, 3000, 300)
    await asyncio.sleep(1.5)
    os.kill(pid, signal.SIGKILL)
    join_sender(sender)
    await wait_for(db, tenant, {"accepted": 3000, "archived": 3000, "aggregated": 3000})
    assert consumer_pids(ray, [shard_id])[shard_id] != pid
    await assert_exact(settings, db, tenant, events)


async def test_a_zombie_consumer_past_its_lease_cannot_commit(lap_up, settings, db, ray_driver):
    """A consumer frozen (SIGSTOP) mid-run past its lease, while another owner takes the shard: once awake it may
    not commit. The new owner (this test) commits nothing, so any batch of the shard committed while it holds the
    lease would be the zombie's. Then the lease runs out, the consumer takes the shard back, and nothing is lost
    or stored twice."""
    import asyncpg

    from lap.process import leases

    ray = ray_driver
    tenant, events, shard_id, pid, sender = await traffic_past_a_consumer(lap_up, settings, ray, 2000, 200)
    await asyncio.sleep(1.0)
    # the usurper gives up on a row lock after 2 s: a consumer frozen inside its commit holds one
    usurper = await asyncpg.create_pool(settings.db.dsn.get_secret_value(), min_size=1, max_size=1,
                                        server_settings={"lock_timeout": "2000"})
    usurped = None
    try:
        for _ in range(8):  # on a busy machine a commit takes long, and the freeze falls inside one more often
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(settings.process.lease_ttl_s + 1)  # its lease runs out while it sleeps
            since = await db.fetchval("SELECT now()")
            try:
                usurped = await leases.take(usurper, settings, shard_id, "test-usurper")  # as a new consumer would
            except asyncpg.LockNotAvailableError:  # frozen mid-commit: let it finish, and freeze it again
                os.kill(pid, signal.SIGCONT)
                await asyncio.sleep(0.5)
                continue
            os.kill(pid, signal.SIGCONT)
            break
    finally:
        os.kill(pid, signal.SIGCONT)
        await usurper.close()
    assert usurped is not None, "the frozen consumer's lease could not be taken"
    await asyncio.sleep(settings.process.lease_ttl_s / 2)  # awake, with records read, inside the usurper's lease
    zombie_commits = await db.fetchval(
        "SELECT count(*) FROM batches WHERE stream = $1 AND shard_id = $2 AND committed_at > $3",
        settings.stream.name, shard_id, since)
    assert zombie_commits == 0
    join_sender(sender)
    await wait_for(db, tenant, {"accepted": 2000, "archived": 2000, "aggregated": 2000})
    owner, epoch = await db.fetchrow("SELECT lease_owner, lease_epoch FROM shard_checkpoints WHERE shard_id = $1 "
                                     "AND stream = $2", shard_id, settings.stream.name)
    assert owner != "test-usurper" and epoch > usurped.epoch  # the consumer took the shard back after the usurper
    await assert_exact(settings, db, tenant, events)


@pytest.mark.parametrize("victim", ["consumer", "postgres"])
async def test_a_kill_between_the_archive_write_and_the_commit(lap_up, settings, db, ray_driver, victim):
    """Postgres frozen (SIGSTOP) while a batch is in flight: its consumer writes the archive object, then waits on
    the commit. Right there (the object is in S3, its manifest is not) the consumer is SIGKILLed, or Postgres is,
    in the middle of that commit. Postgres comes back (thawed, or restarted by `lap up`), and the batch is
    committed again: every event stored once, the aggregates exact."""
    import psutil

    from tests.support.sensors import Sensor

    ray = ray_driver
    tenant, token = new_tenant(lap_up)
    events = make_events(1500, learners=150)
    pids = consumer_pids(ray, [s["ShardId"] for s in await open_shards(settings)])
    postmaster = psutil.Process(lap_up.state["stand_ins"]["postgres"]["pid"])
    sensor = Sensor(settings, token, events, per=50)  # retries the 503s of the freeze
    sensor.start()
    await asyncio.sleep(0.5)
    frozen = [postmaster, *postmaster.children(recursive=True)]
    for proc in frozen:
        proc.send_signal(signal.SIGSTOP)
    killed = None
    try:
        async with AsyncExitStack() as stack:
            s3 = await open_client(stack, settings, "s3")
            prefix = f"{settings.archive.prefix}/tenant={tenant}/"
            for _ in range(100):  # an archive object of this tenant: a batch now waits on its commit
                listing = await s3.list_objects_v2(Bucket=settings.archive.bucket, Prefix=prefix)
                keys = [o["Key"] for o in listing.get("Contents", [])]
                if keys:
                    shard = keys[0].split("/shard=")[1].split("/")[0]
                    killed = pids[shard] if victim == "consumer" else postmaster.pid
                    for proc in [psutil.Process(killed)] if victim == "consumer" else frozen:
                        proc.send_signal(signal.SIGKILL)
                    break
                await asyncio.sleep(0.2)
    finally:
        for proc in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)
    assert killed is not None, "no batch reached its archive write while Postgres was frozen"
    sensor.join(300)
    assert not sensor.is_alive() and len(sensor.acknowledged) == len(events), sensor.statuses
    if victim == "postgres":
        from lap.sinks.store import connect

        assert lap_up.state["stand_ins"]["postgres"]["pid"] != killed  # `lap up` started it again
        db.terminate()  # its server was killed
        db = await connect(settings)
    try:
        await wait_for(db, tenant, {"archived": len(events), "aggregated": len(events)})
        if victim == "consumer":
            assert killed not in consumer_pids(ray, list(pids)).values()  # Ray restarted it
        await assert_exact(settings, db, tenant, events)
    finally:
        if victim == "postgres":
            await db.close()


async def test_s3_killed_in_the_middle_of_batches(lap_up, settings, db, ray_driver):
    """S3 frozen (SIGSTOP) while a sensor sends: every consumer with records is stopped inside its batch's S3
    writes. S3 is SIGKILLed there, and `lap up` starts it again: the batches fail (an outage, not poison: nothing
    is dead-lettered), are read again from their checkpoints and committed, and what the failed tries left in S3
    is no committed batch's and goes with the sweep. Every event is stored once."""
    import psutil

    from tests.support.sensors import Sensor

    ray = ray_driver
    tenant, token = new_tenant(lap_up)
    events = make_events(1500, learners=150)
    s3_proc = psutil.Process(lap_up.state["stand_ins"]["s3"]["pid"])
    sensor = Sensor(settings, token, events, per=50)
    sensor.start()
    await asyncio.sleep(1.0)
    s3_proc.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(2 * settings.process.batch_max_wait_s + 1.0)  # every due batch is now in its S3 writes
        totals = await stage_totals(db, tenant)
        assert totals.get("acknowledged", 0) > totals.get("archived", 0), totals  # with events on their way
        s3_proc.send_signal(signal.SIGKILL)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            s3_proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    while lap_up.state["stand_ins"]["s3"]["pid"] == s3_proc.pid:
        assert time.monotonic() < deadline, "lap up did not start S3 again"
        await asyncio.sleep(0.5)
    sensor.join(300)
    assert not sensor.is_alive() and len(sensor.acknowledged) == len(events), sensor.statuses
    await wait_for(db, tenant, {"accepted": len(events), "archived": len(events), "aggregated": len(events)})
    assert await db.fetchval("SELECT count(*) FROM dead_letters WHERE tenant = $1", tenant) == 0
    await assert_exact(settings, db, tenant, events)
    async with AsyncExitStack() as stack:  # what failed tries left behind is swept; committed objects stay
        s3 = await open_client(stack, settings, "s3")
        prefix = f"{settings.archive.prefix}/tenant={tenant}/"
        listed = await s3.list_objects_v2(Bucket=settings.archive.bucket, Prefix=prefix)
        committed = {r["key"] for r in await db.fetch("SELECT key FROM archive_objects WHERE tenant = $1", tenant)}
        assert committed <= {o["Key"] for o in listed.get("Contents", [])}
        ray.get(ray.get_actor(COORDINATOR).sweep.remote(grace_s=0), timeout=120)
        listed = await s3.list_objects_v2(Bucket=settings.archive.bucket, Prefix=prefix)
        assert {o["Key"] for o in listed.get("Contents", [])} == committed


async def test_a_frozen_stream_gets_503s_and_loses_nothing(lap_up, settings, db):
    """Kinesis frozen (SIGSTOP) while a sensor sends: every refusal is a 503 (never a 500), the sensor resends,
    and once the stream is back the consumers go on: every acknowledged event is stored exactly once."""
    import psutil

    from tests.support.sensors import Sensor

    tenant, token = new_tenant(lap_up)
    events = make_events(3000)
    sensor = Sensor(settings, token, events, per=50)  # stops at any reply but 200, 429 or 503
    kinesis = psutil.Process(lap_up.state["stand_ins"]["kinesis"]["pid"])
    frozen = [kinesis, *kinesis.children(recursive=True)]
    sensor.start()
    await asyncio.sleep(1.0)
    for proc in frozen:
        proc.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(settings.limits.put_deadline_s + 4)  # past the put deadline: requests get their 503
        statuses_while_frozen = dict(sensor.statuses)
    finally:
        for proc in frozen:
            proc.send_signal(signal.SIGCONT)
    sensor.join(300)
    assert not sensor.is_alive() and not sensor.transport_errors, sensor.transport_errors[:3]
    assert statuses_while_frozen.get(503, 0) >= 1, statuses_while_frozen
    assert set(sensor.statuses) <= {200, 503}, sensor.statuses
    assert len(sensor.acknowledged) == len(events)
    await wait_for(db, tenant, {"archived": len(events), "aggregated": len(events)})
    await assert_exact(settings, db, tenant, events)


async def test_a_stream_restart_is_ridden_out_in_place(lap_up, settings, db, ray_driver):
    """The stream stand-in SIGKILLed and restarted by the supervisor: each consumer asks its read again in the same
    process (no restart, no dedup state loaded again), and what is sent afterwards is processed."""
    shard_ids = [s["ShardId"] for s in await open_shards(settings)]
    before = consumer_pids(ray_driver, shard_ids)
    old = lap_up.state["stand_ins"]["kinesis"]["pid"]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while lap_up.state["stand_ins"]["kinesis"]["pid"] == old:
        assert time.monotonic() < deadline, "the stream stand-in was not restarted"
        await asyncio.sleep(0.5)
    tenant, token = new_tenant(lap_up)
    events = make_events(300)
    send(settings, token, envelopes(events))
    await wait_for(db, tenant, {"accepted": 300, "archived": 300, "aggregated": 300})
    assert consumer_pids(ray_driver, shard_ids) == before
    await assert_exact(settings, db, tenant, events)


async def test_opensearch_outage_pauses_only_indexing(lap_up, settings, db):
    tenant, token = new_tenant(lap_up)
    events = make_events(800)
    osmem = lap_up.state["stand_ins"]["opensearch"]["pid"]
    os.kill(osmem, signal.SIGSTOP)
    try:
        send(settings, token, envelopes(events))
        totals = await wait_for(db, tenant, {"accepted": 800, "archived": 800, "aggregated": 800})
        assert totals.get("indexed", 0) < 800
        await assert_exact(settings, db, tenant, events)
    finally:
        os.kill(osmem, signal.SIGCONT)
    await wait_for(db, tenant, {"indexed": 800}, timeout=180, settings=settings)
    search = open_opensearch(settings)
    try:
        count = await search.count(index=index_name(settings, tenant))
        assert count["count"] == 800
        doc = await search.get(index=index_name(settings, tenant), id=events[0]["id"])
        source = doc["_source"]
        assert doc["_id"] == events[0]["id"]
        assert source["learner"] == expected_records(tenant, events[:1])[0]["meta"]["learner"]
        # the event itself stays in the archive: the document points at its batch (docs/operators.md, "The audit trail")
        assert "event" not in source and "event_id" not in source and isinstance(source["batch"], int)
        assert await db.fetchval("SELECT count(*) FROM archive_objects WHERE batch_id = $1 AND tenant = $2",
                                 source["batch"], tenant) >= 1
    finally:
        await search.close()


async def test_orphaned_archive_objects_are_swept(lap_up, settings, db, ray_driver):
    ray = ray_driver
    orphan = f"{settings.archive.prefix}/tenant=orphans/date=2026-01-01/hour=00/shard=x/1-2.jsonl.gz"
    # receipts and dedup rows past the dedup window go with the sweep; newer ones stay
    window = timedelta(seconds=settings.process.dedup_window_s)
    old, new = datetime.now(timezone.utc) - window - timedelta(days=1), datetime.now(timezone.utc) - window / 2
    for n, received in enumerate((old, new)):
        await db.execute("""INSERT INTO receipts (event_id, tenant, sensor, shard_id, sequence_number, received_at,
                                                  request_id, kind) VALUES ($1, 'pruned', 's', 'x', 1, $2, 'r', 'event')""",
                         f"urn:uuid:prune-{n}", received)
        await db.execute("""INSERT INTO seen_events (tenant, event_id, received_at, batch_id, shard_id, sequence_number)
                            VALUES ('pruned', $1, $2, 0, 'x', 1)""", f"urn:uuid:prune-{n}", received)
    # and past the window the minute counters fold into one row per hour, at its first minute
    hour = old.replace(minute=0, second=0, microsecond=0)
    for at, n in ((hour + timedelta(minutes=5), 3), (hour + timedelta(minutes=35), 4), (new.replace(second=0), 5)):
        await db.execute("""INSERT INTO stage_counts (tenant, sensor, shard_id, received_minute, stage, events)
                            VALUES ('pruned', 's', 'x', $1, 'accepted', $2)""", at.replace(microsecond=0), n)
    # the audit trail's objects past the window go too: receipts, and saved dedup buckets
    await db.execute("INSERT INTO tenants (name) VALUES ('pruned') ON CONFLICT DO NOTHING")
    old_receipts, new_receipts = (
        f"{settings.archive.receipts_prefix}/tenant=pruned/date={at:%Y-%m-%d}/hour={at:%H}/shard=x/1-2.m00-00.json.gz"
        for at in (old, new))
    old_bucket = f"{settings.archive.dedup_prefix}/stream=pruned/shard=x/old.u64"
    await db.execute("""INSERT INTO dedup_segments (stream, shard_id, bucket_start, key, events)
                        VALUES ('pruned', 'x', $1, $2, 1)""", hour, old_bucket)
    async with AsyncExitStack() as stack:
        s3 = await open_client(stack, settings, "s3")
        await s3.put_object(Bucket=settings.archive.bucket, Key=orphan, Body=gzip.compress(b"{}\n"))
        for key in (old_receipts, new_receipts, old_bucket):
            await s3.put_object(Bucket=settings.archive.bucket, Key=key, Body=b"x")
        coordinator = ray.get_actor(COORDINATOR)
        # a grace of 0 s is for this test only: with traffic in flight it would race with uncommitted batches
        assert ray.get(coordinator.sweep.remote(grace_s=0), timeout=120) >= 1
        listed = await s3.list_objects_v2(Bucket=settings.archive.bucket, Prefix=orphan)
        assert listed.get("KeyCount", 0) == 0
        committed = [r["key"] for r in await db.fetch(  # but those S3 lost, which other tests cause
            """SELECT key FROM archive_objects o
                WHERE NOT EXISTS (SELECT 1 FROM lost_archive_objects l WHERE l.key = o.key) LIMIT 50""")]
        assert committed
        for key in committed:  # nothing the manifest names was touched
            await s3.head_object(Bucket=settings.archive.bucket, Key=key)
        for key, kept in ((old_receipts, False), (old_bucket, False), (new_receipts, True)):
            listed = await s3.list_objects_v2(Bucket=settings.archive.bucket, Prefix=key)
            assert listed.get("KeyCount", 0) == int(kept), key
        await s3.delete_object(Bucket=settings.archive.bucket, Key=new_receipts)
    assert await db.fetchval("SELECT count(*) FROM dedup_segments WHERE stream = 'pruned'") == 0
    for table in ("receipts", "seen_events"):
        kept = await db.fetch(f"SELECT event_id FROM {table} WHERE tenant = 'pruned'")
        assert [r["event_id"] for r in kept] == ["urn:uuid:prune-1"], table
    counters = await db.fetch("SELECT received_minute, events FROM stage_counts WHERE tenant = 'pruned' "
                              "ORDER BY received_minute")
    assert [(r["received_minute"], r["events"]) for r in counters] == [(hour, 7), (new.replace(second=0, microsecond=0), 5)]


async def test_split_shard_mid_run_loses_nothing(lap_up, settings, db):
    tenant, token = new_tenant(lap_up)
    events = make_events(3000, learners=400)
    parent = (await open_shards(settings))[0]
    started = datetime.now(timezone.utc)
    sender = send_in_background(settings, token, envelopes(events), pause_s=0.1)
    await asyncio.sleep(1.5)
    low, high = int(parent["HashKeyRange"]["StartingHashKey"]), int(parent["HashKeyRange"]["EndingHashKey"])
    async with AsyncExitStack() as stack:
        kinesis = await open_client(stack, settings, "kinesis")
        await kinesis.split_shard(StreamName=settings.stream.name, ShardToSplit=parent["ShardId"],
                                  NewStartingHashKey=str((low + high) // 2))
    split_at = datetime.now(timezone.utc)
    join_sender(sender)
    await wait_for(db, tenant, {"accepted": 3000, "archived": 3000, "aggregated": 3000}, timeout=180)
    await assert_exact(settings, db, tenant, events)

    # ingest followed the split: a second after it, each learner's events go to the child that owns the learner
    shards = ShardMap(await open_shards(settings))
    learner_of = {r["meta"]["event_id"]: r["meta"]["learner"] for r in expected_records(tenant, events)}
    receipts = await receipts_of(settings, tenant, started)
    later = [(receipts.event_id[i], receipts.shard(i)) for i in range(len(receipts))
             if receipts.received_us[i] > (split_at + timedelta(seconds=1)).timestamp() * 1e6]
    assert len(later) > 300, "the sender must still be sending after the split"
    assert [e for e, shard in later if shard != shards.shard_ids[shards.slot(learner_of[e])]] == []
    # and the children took the parent's dedup state: the whole course sent again is all duplicates
    send(settings, token, envelopes(events))
    totals = await wait_for(db, tenant, {"accepted": 6000, "duplicates": 3000}, timeout=180)
    assert totals["archived"] == totals["aggregated"] == 3000
    await assert_exact(settings, db, tenant, events)

    children = await db.fetch("SELECT shard_id FROM shard_checkpoints WHERE $1 = ANY(parent_ids)", parent["ShardId"])
    assert len(children) == 2
    assert await db.fetchval("SELECT finished FROM shard_checkpoints WHERE shard_id = $1", parent["ShardId"])
    # the parent was drained before its children's first batch
    parent_last = await db.fetchval("SELECT max(committed_at) FROM batches WHERE shard_id = $1", parent["ShardId"])
    child_first = await db.fetchval("SELECT min(committed_at) FROM batches WHERE shard_id = ANY($1)",
                                    [c["shard_id"] for c in children])
    assert child_first is not None and child_first >= parent_last


async def test_documents_opensearch_refuses_are_recorded_with_the_reason(lap_up, settings, db):
    tenant, token = new_tenant(lap_up)
    search = open_opensearch(settings)
    try:
        # the tenant's index made by hand with a mapping LAP's documents cannot fit: a permanent refusal
        await search.indices.create(index=index_name(settings, tenant),
                                    body={"mappings": {"properties": {"learner": {"type": "long"}}}})
    finally:
        await search.close()
    events = make_events(100)
    send(settings, token, envelopes(events))
    await wait_for(db, tenant, {"accepted": 100, "archived": 100, "aggregated": 100})
    deadline = time.monotonic() + 60
    failures = []
    while time.monotonic() < deadline:
        failures = await db.fetch("SELECT event_id, status, reason FROM index_failures WHERE tenant = $1", tenant)
        if len(failures) == 100:
            break
        await asyncio.sleep(0.5)
    assert {f["event_id"] for f in failures} == {e["id"] for e in events}
    assert all(400 <= f["status"] < 500 and f["reason"] for f in failures)
    assert (await stage_totals(db, tenant)).get("indexed", 0) == 0


async def test_dedup_state_survives_consumer_restarts(lap_up, settings, db, ray_driver):
    """Consumers killed through Ray load their dedup state again (from their committed batches): a course sent
    again after the restart is all duplicates."""
    ray = ray_driver
    tenant, token = new_tenant(lap_up)
    events = make_events(600)
    bodies = envelopes(events)
    send(settings, token, bodies)
    await wait_for(db, tenant, {"accepted": 600, "archived": 600, "aggregated": 600})
    shard_ids = [s["ShardId"] for s in await open_shards(settings)]
    pids_before = consumer_pids(ray, shard_ids)
    for shard_id in shard_ids:
        ray.kill(ray.get_actor(consumer_name(shard_id)), no_restart=False)
    for _ in range(60):  # Ray restarts them
        try:
            if all(pid != pids_before[s] for s, pid in consumer_pids(ray, shard_ids).items()):
                break
        except Exception:  # noqa: BLE001 - an actor still restarting
            pass
        await asyncio.sleep(1)
    send(settings, token, bodies)
    totals = await wait_for(db, tenant, {"accepted": 1200, "duplicates": 600})
    assert totals["archived"] == totals["aggregated"] == 600
    await assert_exact(settings, db, tenant, events)


async def test_a_lost_index_is_rebuilt_behind_new_events(lap_up, settings, db, ray_driver):
    """OpenSearch's data is lost (its node killed, its disk gone) and it restarts empty: new events are indexed
    first, the archive is indexed again behind them, the rebuild shows as such (not as missing), and every event
    ends up indexed and counted once."""
    from lap.process.index_writer import INDEX_WRITER

    started = datetime.now(timezone.utc)
    tenant, token = new_tenant(lap_up)
    reader = run_lap("keys", "create", "--tenant", tenant, "--role", "reader", config=lap_up.config).stdout.strip()
    old = make_events(300)
    send(settings, token, envelopes(old))
    await wait_for(db, tenant, {"archived": 300, "indexed": 300}, settings=settings)
    writer_pid = ray_driver.get(ray_driver.get_actor(INDEX_WRITER).pid.remote(), timeout=30)
    os.kill(writer_pid, signal.SIGSTOP)  # so that the rebuild cannot start before it is looked at
    try:
        lose_opensearch_data(lap_up)
        deadline = time.monotonic() + 90
        while not await db.fetchval("SELECT count(*) FROM index_backfill"):  # the supervisor provisions again
            assert time.monotonic() < deadline, "no index rebuild was set up after OpenSearch restarted empty"
            await asyncio.sleep(0.5)
        health = {}
        for _ in range(60):
            health = httpx.get(f"{settings.api_url}/healthz", timeout=30).json()
            if "rebuilding" in health["components"]["opensearch"]["detail"]:
                break
            await asyncio.sleep(0.5)
        assert "rebuilding from the archive" in health["components"]["opensearch"]["detail"], health
        assert "rebuilding from the archive" in run_lap("status", config=lap_up.config, check=False).stdout
        span = {"start": (started - timedelta(minutes=1)).isoformat(),
                "end": (datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat()}
        report = httpx.get(f"{settings.api_url}/v1/audit/reconcile", params=span, timeout=60,
                           headers={"Authorization": f"Bearer {reader}"}).json()
        assert (report["indexed"], report["index_pending"], report["missing"]["index"]) == (0, 300, 0), report
        new = make_events(100)
        send(settings, token, envelopes(new))
        await wait_for(db, tenant, {"archived": 400})
    finally:
        os.kill(writer_pid, signal.SIGCONT)
    await wait_for(db, tenant, {"indexed": 400}, timeout=300, settings=settings)
    deadline = time.monotonic() + 300
    while await db.fetchval("SELECT count(*) FROM index_backfill"):
        assert time.monotonic() < deadline, "the index rebuild did not finish"
        await asyncio.sleep(1)
    search = open_opensearch(settings)
    try:
        await search.indices.refresh(index=index_name(settings, tenant))
        hits = (await search.search(index=index_name(settings, tenant), body={
            "size": 1000, "seq_no_primary_term": True, "query": {"match_all": {}}}))["hits"]["hits"]
    finally:
        await search.close()
    assert sorted(h["_id"] for h in hits) == sorted(e["id"] for e in old + new)  # each event once
    new_ids = {e["id"] for e in new}
    assert max(h["_seq_no"] for h in hits if h["_id"] in new_ids) < min(h["_seq_no"] for h in hits
                                                                          if h["_id"] not in new_ids)
    assert (await stage_totals(db, tenant))["indexed"] == 400  # counted once
    assert "rebuilding" not in httpx.get(f"{settings.api_url}/healthz", timeout=30).json()[
        "components"]["opensearch"]["detail"]


async def test_a_killed_opensearch_comes_back_with_its_index(lap_up, settings, db):
    """SIGKILL, then the supervisor's restart: the documents are all there, and nothing is indexed again."""
    tenant, token = new_tenant(lap_up)
    events = make_events(200)
    send(settings, token, envelopes(events))
    await wait_for(db, tenant, {"archived": 200, "indexed": 200}, settings=settings)
    old_pid = lap_up.state["stand_ins"]["opensearch"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while lap_up.state["stand_ins"]["opensearch"]["pid"] == old_pid or \
            httpx.get(f"{settings.api_url}/healthz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "OpenSearch did not come back"
        await asyncio.sleep(0.5)
    search = open_opensearch(settings)
    try:
        assert (await search.count(index=index_name(settings, tenant)))["count"] == 200
    finally:
        await search.close()
    assert await db.fetchval("SELECT count(*) FROM index_backfill") == 0  # no rebuild from the archive
    more = make_events(50)
    send(settings, token, envelopes(more))
    totals = await wait_for(db, tenant, {"archived": 250, "indexed": 250}, settings=settings)
    assert totals["indexed"] == 250  # counted once each


def lose_opensearch_data(lap_up) -> None:
    """Kill the OpenSearch node and take its data folder away, so that the supervisor starts it on an empty one.

    The node is frozen first, so that it writes nothing while its folder moves; the empty folder it finds is its
    user's, as `lap up` made the first one."""
    pid = lap_up.state["stand_ins"]["opensearch"]["pid"]
    data = lap_up.settings.data_dir / "opensearch" / "data"
    owner = data.stat()
    os.kill(pid, signal.SIGSTOP)
    lost = data.with_name(f"data-lost-{uuid.uuid4().hex[:8]}")
    data.rename(lost)
    data.mkdir()
    os.chown(data, owner.st_uid, owner.st_gid)
    os.kill(pid, signal.SIGKILL)
    shutil.rmtree(lost)
    deadline = time.monotonic() + 90
    while lap_up.state["stand_ins"]["opensearch"]["pid"] == pid:
        assert time.monotonic() < deadline, "OpenSearch was not restarted"
        time.sleep(0.5)


async def test_documents_past_the_index_retention_are_removed(settings):
    from lap.sinks.index import expire_documents

    prefix = f"lap-expiry-{uuid.uuid4().hex[:8]}"
    kept = settings.model_copy(update={"index": settings.index.model_copy(update={"index_prefix": prefix}),
                                       "retention": settings.retention.model_copy(update={"index_days": 2.0})})
    search = open_opensearch(settings)
    try:
        now = datetime.now(timezone.utc)
        for n, age in enumerate((timedelta(days=3), timedelta(days=1), timedelta(hours=1))):
            await search.index(index=f"{prefix}-t", id=str(n), body={"received_at": (now - age).isoformat()},
                               params={"refresh": "true"})
        assert await expire_documents(search, kept) == 1
        await search.indices.refresh(index=f"{prefix}-t")
        left = (await search.search(index=f"{prefix}-t", body={"query": {"match_all": {}}}))["hits"]["hits"]
        assert sorted(h["_id"] for h in left) == ["1", "2"]
        no_limit = kept.model_copy(update={"retention": kept.retention.model_copy(update={"index_days": 0})})
        assert await expire_documents(search, no_limit) == 0
    finally:
        await search.indices.delete(index=f"{prefix}-*", params={"ignore_unavailable": "true"})
        await search.close()


def test_rays_processes_run_with_lap_allocator_settings(ray_driver):
    """The actors inherit runner.MALLOC_ENV from the raylet (what keeps their memory flat in the soak)."""
    from lap.process.index_writer import INDEX_WRITER
    from lap.runner import MALLOC_ENV

    writer_pid = ray_driver.get(ray_driver.get_actor(INDEX_WRITER).pid.remote(), timeout=30)
    with open(f"/proc/{writer_pid}/environ", "rb") as handle:
        environment = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
    assert {name: environment.get(name.encode(), b"").decode() for name in MALLOC_ENV} == MALLOC_ENV
