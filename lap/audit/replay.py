"""Replay: puts the events reconcile finds missing back into each stage, through the live writers.

- aggregate (and archive): ids that no committed batch stored are read again,
  from the archive (any object under the window's tenant-and-hour prefixes,
  orphans included: a batch that never committed may have left one) or from
  the stream (by the shard, record and position of their receipt), and go
  through the consumers' BatchWriter in replay mode: archive, aggregate and
  commit. Reconcile reports events its consumer has not reached as pending,
  never as missing, so the live consumer never reads a replayed event again.
  Dead-lettered events (records a consumer could not process) are read from
  their dead-letter objects, and their dead letters closed once stored; a
  record that still fails stays dead-lettered, and the rest goes on.
- archive: an object a manifest names but S3 no longer has is written again
  from the stream, with the same key and the same lines.
- index: ids missing from the index are read from their archive objects and
  bulk-indexed (the document id is the event id).

Every step skips what is already there, so a second replay changes nothing;
one replay per tenant runs at a time (a Postgres advisory lock).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import numpy as np
import orjson

from lap.audit.receipts import StageTally, rewrite_receipts
from lap.audit.tombstones import Tombstones
from lap.audit.reconcile import Reconciler, Trail, Window
from lap.buckets import hour_of, parse_time
from lap.process.batch import (
    POISON,
    BatchWriter,
    Decoded,
    archive_line,
    decode_record,
)
from lap.process.index_writer import bulk_index
from lap.settings import Settings
from lap.sinks.archive import hour_prefix, pack_lines, put_object, read_object
from lap.sinks.index import document_id
from lap.stream.record_format import NotLapRecord, StreamRecord

log = logging.getLogger("lap.replay")

STAGES = ("archive", "aggregate", "index")
ALL_IDS = 10_000_000


class ReplayError(Exception):
    """The replay cannot do what was asked (say, rebuild an archive object from the archive)."""


class ReplayBusy(ReplayError):
    """Another replay of the tenant holds its lock: one whose replica is alive."""


def check_replay_window(settings: Settings, start: datetime) -> None:
    """Raises ReplayError for a window that starts past the dedup window (less an hour, for the replay's own time):
    the consumers have forgotten those ids, so a replay would count events twice."""
    oldest = datetime.now(timezone.utc) - timedelta(seconds=settings.process.dedup_window_s) + timedelta(hours=1)
    if start < oldest:
        raise ReplayError(f"a replay must start after {oldest:%Y-%m-%dT%H:%M}Z: older events are past the dedup "
                          "window (process.dedup_window_s), so LAP can no longer tell which are stored")


def tenant_jobs_lock(tenant: str) -> int:
    """The advisory lock a replay or an erasure of a tenant holds while it runs: one at a time, so that a replay
    never restores what an erasure is taking out."""
    return int.from_bytes(hashlib.blake2b(f"replay:{tenant}".encode(), digest_size=8).digest(), "big", signed=True)


def new_replay_id() -> str:
    return uuid.uuid4().hex[:12]


class StreamRecords:
    """Events read back from the stream by record and position, each record read once."""

    def __init__(self, replayer: "Replayer"):
        self.replayer = replayer
        self.records: dict[tuple[str, str], list[Decoded] | None] = {}

    async def event(self, shard_id: str, sequence: str, position: int) -> Decoded | None:
        key = (shard_id, sequence)
        if key not in self.records:
            record = await self.replayer.stream_record(shard_id, sequence)
            try:
                self.records[key] = decode_record(record) if record is not None else None
            except NotLapRecord as exc:
                log.error("record %s/%s is not a LAP record: %s", shard_id, sequence, exc)
                self.records[key] = None
        events = self.records[key]
        return events[position] if events is not None and 0 <= position < len(events) else None


class Replayer:
    def __init__(self, settings: Settings, pool, s3, search, kinesis, progress: Callable[[str, int, int], None]):
        self.settings = settings
        self.pool = pool
        self.s3 = s3
        self.search = search
        self.kinesis = kinesis
        self.progress = progress  # (step, done, total)

    async def run(self, replay_id: str, window: Window, stages: list[str], source: str) -> dict[str, Any]:
        check_replay_window(self.settings, window.start)
        reconciler = Reconciler(self.settings, self.pool, self.s3, self.search)
        lock = tenant_jobs_lock(window.tenant)
        async with self.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock):
                raise ReplayBusy(f"another replay or an erasure of tenant {window.tenant!r} is running; ask again "
                                 "when it is done")
            try:
                before = await reconciler.run(window)
                trail = await reconciler.trail(window)
                done: dict[str, int] = {}
                if "aggregate" in stages or "archive" in stages:
                    done["restored"] = await self.restore(replay_id, window, trail, source)
                if "archive" in stages:
                    done["objects_rewritten"] = await self.rewrite_objects(window, trail, source)
                if "index" in stages:
                    done["indexed"] = await self.reindex(window, await reconciler.trail(window))
                after = await reconciler.run(window)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", lock)
        return {"replayed": done, "before": before.as_dict(), "after": after.as_dict()}

    # --- aggregate: events no committed batch stored -------------------------------------------

    async def restore(self, replay_id: str, window: Window, trail: Trail, source: str) -> int:
        """Store the ids no batch stored: the dead-lettered ones from their dead-letter objects, the rest from
        `source`; then close the dead letters whose events are all stored now."""
        missing = [int(k) for k in np.flatnonzero(~trail.stored & ~trail.in_flight)]  # the live consumer stores those
        if not missing:
            return 0
        events = await self.from_dead_letters(window, {trail.id(k) for k in missing if trail.dead[k]})
        found = {event.meta["event_id"] for _, event in events}
        rest = [k for k in missing if trail.id(k) not in found]
        if rest and source == "archive":
            events += await self.from_archive(window, {trail.id(k) for k in rest})
        elif rest:
            events += await self.from_stream([(trail.id(k), trail.first_copy(k)) for k in rest])
        by_shard: dict[str, list[Decoded]] = defaultdict(list)
        for shard, event in events:
            by_shard[shard].append(event)
        restored = 0
        total = len(events)
        tombstones = Tombstones()
        for shard, shard_events in sorted(by_shard.items()):
            shard_events.sort(key=lambda e: (e.sequence, e.position))
            writer = BatchWriter(self.settings, self.pool, self.s3, shard, None, replay=replay_id,
                                 tombstones=tombstones)
            restored += await self.store(writer, shard_events)
            self.progress("aggregate", restored, total)
        if tombstones:  # events of erased learners were counted erased, not stored: their receipts name them so
            erased = {e.meta["event_id"] for _, e in events if tombstones.erasure_of(e.meta) is not None}
            await self.rename_in_receipts(window.tenant, trail, [k for k in missing if trail.id(k) in erased])
        if len(missing) > len(events):
            log.warning("replay %s: %d of %d ids were not found in the %s", replay_id, len(missing) - len(events),
                        len(missing), source)
        if trail.dead.any():
            await self.close_dead_letters(replay_id, window)
        return restored

    async def rename_in_receipts(self, tenant: str, trail: Trail, erased: list[int]) -> None:
        """Name these events by fingerprint in the receipt objects of the copies that counted for them."""
        by_object: dict[tuple, set[str]] = defaultdict(set)
        for k in erased:
            i = trail.chosen[k]
            obj = trail.receipts.objects[trail.receipts.obj[i]]
            by_object[(obj.shard, obj.first, obj.last, trail.hour(k))].add(trail.id(k))
        for (shard, first, last, hour), ids in by_object.items():
            await rewrite_receipts(self.s3, self.settings, tenant, hour, shard, first, last, ids)

    async def store(self, writer: BatchWriter, events: list[Decoded]) -> int:
        """Commit the events, record by record if they are poison; those that still fail stay where they are."""
        try:
            return (await writer.process_events(events[0].sequence, events[-1].sequence,
                                                len({e.sequence for e in events}), events)).kept
        except POISON as exc:
            log.error("replay: events of shard %s failed (%s: %s); storing them record by record", writer.shard_id,
                      type(exc).__name__, exc)
        stored = 0
        by_record: dict[int, list[Decoded]] = defaultdict(list)
        for event in events:
            by_record[event.sequence].append(event)
        for sequence, record_events in sorted(by_record.items()):
            try:
                stored += (await writer.process_events(sequence, sequence, 1, record_events)).kept
            except POISON as exc:
                log.error("replay: record %s of shard %s still fails (%s: %s); it stays dead-lettered", sequence,
                          writer.shard_id, type(exc).__name__, exc)
        return stored

    async def from_dead_letters(self, window: Window, wanted: set[str]) -> list[tuple[str, Decoded]]:
        """The wanted events of the window's open dead letters, from the records they keep."""
        if not wanted:
            return []
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT shard_id, key FROM dead_letters
                    WHERE stream = $1 AND tenant = $2 AND received_at >= $3 AND received_at < $4
                      AND replayed_at IS NULL ORDER BY shard_id, sequence_number""",
                self.settings.stream.name, window.tenant, window.start, window.end)
        found = []
        for row in rows:
            reply = await self.s3.get_object(Bucket=self.settings.archive.bucket, Key=row["key"])
            async with reply["Body"] as body:
                kept = orjson.loads(await body.read())
            record = StreamRecord(int(kept["sequence_number"]), base64.b64decode(kept["data_base64"]))
            found += [(row["shard_id"], event) for event in decode_record(record) if event.meta["event_id"] in wanted]
        return found

    async def close_dead_letters(self, replay_id: str, window: Window) -> None:
        """Mark replayed the window's dead letters whose events some batch or replay has stored by now."""
        reconciler = Reconciler(self.settings, self.pool, self.s3, self.search)
        stored_now = await reconciler.dead_letter_records(window) - (await reconciler.trail(window)).unstored_records()
        if stored_now:
            async with self.pool.acquire() as conn:
                await conn.executemany(
                    """UPDATE dead_letters SET replayed_at = now(), replay_id = $4
                        WHERE stream = $1 AND shard_id = $2 AND sequence_number = $3 AND replayed_at IS NULL""",
                    [(self.settings.stream.name, shard, Decimal(seq), replay_id) for shard, seq in sorted(stored_now)])

    async def from_archive(self, window: Window, wanted: set[str]) -> list[tuple[str, Decoded]]:
        """Events of any object (committed or orphaned) under the window's hours, for the wanted ids."""
        found: dict[str, tuple[str, Decoded]] = {}
        paginator = self.s3.get_paginator("list_objects_v2")
        hour = hour_of(window.start)
        while hour < window.end:
            prefix = hour_prefix(self.settings, window.tenant, hour)
            async for page in paginator.paginate(Bucket=self.settings.archive.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    for line in await self.read_object(obj["Key"]):
                        meta = line["meta"]
                        if meta["event_id"] in wanted and meta["event_id"] not in found:
                            shard, seq = meta.pop("shard_id"), int(meta.pop("sequence_number"))
                            position = int(meta.pop("position", 0))  # archived before records held many events
                            found[meta["event_id"]] = (shard, Decoded(seq, position, meta, line["item"],
                                                                      parse_time(meta["received_at"])))
            hour += timedelta(hours=1)
        return list(found.values())

    async def from_stream(self, wanted: list[tuple[str, tuple[str, int, int]]]) -> list[tuple[str, Decoded]]:
        """Each wanted id's event, read at the shard, record and position of its receipt."""
        found = []
        records = StreamRecords(self)
        for n, (event_id, (shard, seq, position)) in enumerate(wanted, 1):
            event = await records.event(shard, str(seq), position)
            if event is not None and event.meta["event_id"] == event_id:
                found.append((shard, event))
            self.progress("read stream", n, len(wanted))
        return found

    async def stream_record(self, shard_id: str, sequence: str) -> StreamRecord | None:
        try:
            iterator = (await self.kinesis.get_shard_iterator(
                StreamName=self.settings.stream.name, ShardId=shard_id, ShardIteratorType="AT_SEQUENCE_NUMBER",
                StartingSequenceNumber=sequence))["ShardIterator"]
            reply = await self.kinesis.get_records(ShardIterator=iterator, Limit=1)
        except Exception as exc:  # past retention, or the shard is gone: reported as not found
            log.warning("cannot read %s/%s from the stream: %s", shard_id, sequence, exc)
            return None
        records = reply.get("Records", [])
        if not records or records[0]["SequenceNumber"] != sequence:
            return None
        return StreamRecord.from_get_records(records[0])

    # --- archive: objects a manifest names that S3 lost --------------------------------------

    async def rewrite_objects(self, window: Window, trail: Trail, source: str) -> int:
        lost: dict[tuple[int, datetime], list[int]] = defaultdict(list)
        for k in np.flatnonzero(trail.stored & ~trail.archived & (trail.batch_of >= 0)):
            lost[(trail.batch(k), trail.hour(k))].append(int(k))
        if not lost:
            return 0
        if source != "stream":
            raise ReplayError(f"{len(lost)} archive objects are gone from S3; only the stream can rebuild them "
                              "(replay with source 'stream')")
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT o.key, o.batch_id, o.received_hour, b.shard_id FROM archive_objects o
                     JOIN batches b ON b.id = o.batch_id WHERE o.tenant = $1 AND o.batch_id = ANY($2)""",
                window.tenant, sorted({b for b, _ in lost}))
        objects = {(r["batch_id"], r["received_hour"]): r for r in rows}
        records = StreamRecords(self)
        for n, ((batch, hour), members) in enumerate(sorted(lost.items()), 1):
            obj = objects[(batch, hour)]
            lines = await self.object_lines(obj, records, window)
            await put_object(self.s3, self.settings, obj["key"], pack_lines(lines))
            async with self.pool.acquire() as conn:
                await conn.execute("DELETE FROM lost_archive_objects WHERE key = $1", obj["key"])
            self.progress("archive", n, len(lost))
        return len(lost)

    async def object_lines(self, obj, records: "StreamRecords", window: Window) -> list[bytes]:
        """The same lines as a lost object: what its batch stored of this tenant and hour, from the stream."""
        reconciler = Reconciler(self.settings, self.pool, self.s3, self.search)
        async with self.pool.acquire() as conn:
            batch = await conn.fetchrow("SELECT shard_id, first_seq, last_seq FROM batches WHERE id = $1",
                                        obj["batch_id"])
        hour = obj["received_hour"]
        receipts = await reconciler.load_receipts(
            Window(window.tenant, hour, hour + timedelta(hours=1)),
            batches={(batch["shard_id"], int(batch["first_seq"]), int(batch["last_seq"]))})
        copies = sorted((receipts.seq(i), int(receipts.position[i])) for i in range(len(receipts))
                        if not (receipts.duplicate[i] or receipts.forwarded[i]))
        lines = []
        for seq, position in copies:
            event = await records.event(obj["shard_id"], str(seq), position)
            if event is None:
                raise ReplayError(f"event {seq}/{position} of {obj['key']} is no longer in the stream")
            lines.append(archive_line(event, obj["shard_id"]))
        return lines

    # --- index ---------------------------------------------------------------------------------

    async def reindex(self, window: Window, trail: Trail) -> int:
        reconciler = Reconciler(self.settings, self.pool, self.s3, self.search)
        indexed = await reconciler._indexed_ids(window)
        # not those the index writer has still to reach: it indexes them itself, and counts them
        candidates = np.flatnonzero(trail.archived & ~trail.index_pending)
        wanted = {i: int(k) for k, i in zip(candidates.tolist(), trail.ids(candidates).tolist())
                  if document_id(i) not in indexed}
        if not wanted:
            return 0
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT key, batch_id, received_hour FROM archive_objects WHERE tenant = $1 AND batch_id = ANY($2)",
                window.tenant, sorted({trail.batch(k) for k in wanted.values() if trail.batch(k) is not None}))
            restored = await conn.fetch(
                """SELECT o.key, o.batch_id FROM archive_objects o JOIN batches b ON b.id = o.batch_id
                    WHERE o.tenant = $1 AND o.received_hour >= $2 AND o.received_hour < $3 AND b.stream LIKE 'replay:%'""",
                window.tenant, hour_of(window.start), window.end)
        needed = {(trail.batch(k), trail.hour(k)) for k in wanted.values()}
        objects = [(r["key"], r["batch_id"]) for r in rows if (r["batch_id"], r["received_hour"]) in needed]
        objects += [(r["key"], r["batch_id"]) for r in restored]
        total = len(wanted)
        done = 0
        size = self.settings.process.index_batch_docs
        for key, batch_id in objects:
            lines = [line for line in await self.read_object(key) if line["meta"]["event_id"] in wanted]
            for start in range(0, len(lines), size):
                ok, created, refused = await bulk_index(self.search, self.settings, lines[start:start + size],
                                                        batch_id, earlier_tries=False)
                done += len(ok)
                await self.count_indexed(created)
                for line, status, reason in refused:
                    log.error("replay: %s refused by the index (%s): %s", line["meta"]["event_id"], status, reason)
                self.progress("index", done, total)
        return done

    async def count_indexed(self, created: list[dict[str, Any]]) -> None:
        """The `indexed` counters of the documents this replay made (an index writer that reaches the same events
        later finds them there, and does not count them again)."""
        counts = StageTally()
        for line in created:
            meta = line["meta"]
            counts.count(meta["tenant"], meta.get("sensor"), meta.get("shard_id") or "",
                         parse_time(meta["received_at"]), "indexed")
        if counts:
            async with self.pool.acquire() as conn:
                await counts.write(conn)

    async def read_object(self, key: str) -> list[dict[str, Any]]:
        return await read_object(self.s3, self.settings, key)
