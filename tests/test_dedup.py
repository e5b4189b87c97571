"""The shard consumers' dedup state: fingerprints in memory, saved buckets in S3, batch rows in Postgres."""

from __future__ import annotations

import uuid
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone

import numpy as np

from lap.aws import open_client
from lap.process.dedup import DedupState, DedupStore, fingerprint, fingerprints, from_bytes, to_bytes


def test_fingerprints_tell_tenants_and_ids_apart():
    assert fingerprint("a", "urn:uuid:1") == fingerprint("a", "urn:uuid:1")
    assert len({fingerprint(t, e) for t in ("a", "b") for e in ("urn:uuid:1", "urn:uuid:2")}) == 4
    values = fingerprints([("a", f"id-{i}") for i in range(1000)])
    assert values.dtype == np.uint64 and len(set(values.tolist())) == 1000
    assert (from_bytes(to_bytes(values)) == values).all()


def test_state_finds_what_it_holds_and_forgets_past_the_window():
    state = DedupState(window_s=24 * 3600)
    now = datetime(2026, 11, 30, 12, tzinfo=timezone.utc)
    old = fingerprints([("t", f"old-{i}") for i in range(500)])
    new = fingerprints([("t", f"new-{i}") for i in range(500)])
    state.add(old, [now - timedelta(hours=30)] * 500)
    for start in range(0, 500, 50):  # many batches into one bucket: merged as they pile up
        state.add(new[start:start + 50], [now - timedelta(minutes=5)] * 50)
    other = fingerprints([("t", f"other-{i}") for i in range(500)])
    assert state.contains(old).all() and state.contains(new).all() and not state.contains(other).any()
    assert len(state) == 1000 and state.nbytes == 8000
    assert state.expire(now) == 500
    assert not state.contains(old).any() and state.contains(new).all()


async def test_closed_buckets_are_saved_and_a_new_consumer_loads_them_with_its_parents(settings, db):
    """Save closed buckets to S3 (their batch rows cleared), keep the open one in batch rows; a child shard loads
    its parent's state too."""
    from lap.sinks.store import create_pool

    stream = f"dedup-test-{uuid.uuid4().hex[:8]}"
    parent, child = "shardId-parent", "shardId-child"
    now = datetime.now(timezone.utc)
    old_ids = [("t", f"old-{i}") for i in range(300)]
    new_ids = [("t", f"new-{i}") for i in range(300)]
    pool = await create_pool(settings)
    try:
        async with AsyncExitStack() as stack:
            s3 = await open_client(stack, settings, "s3")
            state = DedupState(settings.process.dedup_window_s)
            store = DedupStore(settings, pool, s3, stream, parent, state)
            for ids, received in ((old_ids, now - timedelta(hours=3)), (new_ids, now)):
                values = fingerprints(ids)
                await db.execute(
                    """INSERT INTO batches (stream, shard_id, first_seq, last_seq, records, events, describes, duplicates,
                                            fingerprints, max_received_at) VALUES ($1, $2, $3, $3, 1, 300, 0, 0, $4, $5)""",
                    stream, parent, int(received.timestamp()), to_bytes(values), received)
                store.add(values, [received] * len(values))
            assert await store.save_closed(now) == 1  # the bucket of three hours ago, not the open one
            unsaved = await db.fetch("SELECT max_received_at FROM batches WHERE stream = $1 AND fingerprints IS NOT NULL",
                                     stream)
            assert [r["max_received_at"] for r in unsaved] == [now]
            assert await store.save_closed(now) == 0  # nothing new to save

            await db.execute("INSERT INTO shard_checkpoints (stream, shard_id, parent_ids) VALUES ($1, $2, $3)",
                             stream, child, [parent])
            loaded = DedupStore(settings, pool, s3, stream, child, DedupState(settings.process.dedup_window_s))
            assert await loaded.load([parent]) == 600
            assert loaded.state.contains(fingerprints(old_ids + new_ids)).all()
            assert not loaded.state.contains(fingerprints([("t", "never")])).any()
            segments = await db.fetch("SELECT key FROM dedup_segments WHERE stream = $1", stream)
            for row in segments:
                await s3.delete_object(Bucket=settings.archive.bucket, Key=row["key"])
    finally:
        for table in ("batches", "dedup_segments", "shard_checkpoints"):
            await db.execute(f"DELETE FROM {table} WHERE stream = $1", stream)
        await pool.close()


async def test_rows_of_the_release_before_are_read_until_they_age_out(settings, db):
    """Migration by reading both: dedup rows (`seen_events`) seed a shard's state, and receipt rows
    (`receipts`) are read by reconcile with the receipt objects."""
    from lap.audit.reconcile import Reconciler, Window
    from lap.sinks.store import create_pool

    tenant = f"legacy{uuid.uuid4().hex[:8]}"
    shard = f"shardId-legacy-{uuid.uuid4().hex[:6]}"
    received = datetime.now(timezone.utc) - timedelta(hours=2)
    await db.execute("""INSERT INTO seen_events (tenant, event_id, received_at, batch_id, shard_id, sequence_number)
                        VALUES ($1, 'urn:uuid:legacy-1', $2, 0, $3, 7)""", tenant, received, shard)
    await db.execute("""INSERT INTO receipts (event_id, tenant, sensor, shard_id, sequence_number, received_at, request_id,
                                              kind) VALUES ('urn:uuid:legacy-1', $1, 's', $2, 7, $3, 'r', 'event')""",
                     tenant, shard, received)
    pool = await create_pool(settings)
    try:
        async with AsyncExitStack() as stack:
            s3 = await open_client(stack, settings, "s3")
            store = DedupStore(settings, pool, s3, settings.stream.name, shard,
                               DedupState(settings.process.dedup_window_s))
            assert await store.load([]) == 1
            assert store.state.contains(fingerprints([(tenant, "urn:uuid:legacy-1")])).all()
            receipts = await Reconciler(settings, pool, s3, None).load_receipts(
                Window(tenant, received - timedelta(minutes=1), received + timedelta(minutes=1)))
            assert receipts.event_id == ["urn:uuid:legacy-1"] and receipts.shard(0) == shard and receipts.seq(0) == 7
    finally:
        await pool.close()
        for table in ("seen_events", "receipts"):
            await db.execute(f"DELETE FROM {table} WHERE tenant = $1", tenant)
