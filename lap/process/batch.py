"""One batch of a shard, from stream records to a committed manifest.

The order is what makes a crash harmless (docs/decisions.md, "Processing: one transaction per batch"):

1. dedup against the shard's in-memory state (lap/process/dedup.py): a read,
   nothing is claimed yet;
2. write, per tenant and hour: the archive object (the events to keep, gzip
   JSON lines) and the receipt object (every copy read, duplicates flagged:
   lap/audit/receipts.py), under keys made of the batch's first and last
   sequence numbers, so a retried batch writes the same keys;
3. aggregate with numpy;
4. commit, in ONE transaction: the lease check, the manifest (with the
   fingerprints of what it stored) and its archive objects, the aggregates, the
   audit counters and the checkpoint;
5. only then add the stored fingerprints to the in-memory dedup state.

An archive object written in step 2 whose transaction never commits is an
orphan: no manifest names it, so nothing reads it, and the sweeper removes it.
Its receipt object stays: the events were read from the stream, and reconcile
finds them missing until the batch is committed again (or replayed).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import asyncpg
import numpy as np
import orjson

from lap import metrics
from lap.audit.receipts import StageTally, encode_receipts, receipt_key
from lap.audit.tombstones import Tombstones, TombstonesMoved, signed64
from lap.buckets import hour_of, parse_time
from lap.caliper import iri_of
from lap.process.aggregate import Aggregates, aggregate_records
from lap.process.dedup import DedupStore, fingerprints, to_bytes
from lap.process.leases import Lease
from lap.settings import Settings
from lap.sinks.archive import archive_key, learner_hash32, pack_lines, put_object
from lap.stream import record_format
from lap.stream.record_format import StreamRecord
from lap.stream.producer import partition_key_for
from lap.stream.shard_map import hash_key

log = logging.getLogger("lap.process")



# What the same records raise again on every try: their data, not a server, is at fault. Such a batch is processed
# again record by record, and a record that still fails is dead-lettered (BatchWriter.dead_letter).
POISON = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError,
          asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.ProgramLimitExceededError)


@dataclass(slots=True)
class Decoded:
    """An event (or describe) with its LAP metadata, plus where the stream put it: record and position."""

    sequence: int
    position: int
    meta: dict[str, Any]
    item: dict[str, Any]
    received_at: datetime
    raw_item: bytes | None = None  # the item's JSON as the stream held it: archived without serialising it again

    @property
    def key(self) -> tuple[str, str]:
        return self.meta["tenant"], self.meta["event_id"]


@dataclass
class BatchResult:
    last_seq: int
    kept: int  # archived and aggregated (events and describes)
    duplicates: int


def decode_record(record: StreamRecord) -> list[Decoded]:
    """The events of one stream record, in position order. Raises NotLapRecord."""
    sequence = record.sequence
    events = record_format.decode_lines(record.data)
    decoded: list[Decoded] = []
    received_text = None
    received = None
    try:
        for position, (meta, item, raw) in enumerate(events):
            meta["tenant"], meta["event_id"]  # noqa: B018 - both are required
            if meta["received_at"] != received_text:  # one per record in format 1: parsed once
                received_text = meta["received_at"]
                received = parse_time(received_text)
            decoded.append(Decoded(sequence, position, meta, item, received, raw))
    except (KeyError, TypeError, ValueError) as exc:
        raise record_format.NotLapRecord(f"an event without LAP's metadata: {exc!r}") from None
    return decoded


def decode(records: list[StreamRecord]) -> tuple[list[Decoded], int]:
    """The events of stream records; the count of records that are not LAP's (logged and skipped)."""
    decoded: list[Decoded] = []
    bad = 0
    for record in records:
        try:
            decoded.extend(decode_record(record))
        except record_format.NotLapRecord as exc:
            bad += 1
            log.error("record %s of the stream is not a LAP record; skipped: %s", record.sequence, exc)
    return decoded, bad


def dead_letter_key(settings: Settings, tenant: str | None, moment: datetime, shard_id: str, sequence: int) -> str:
    owner = "tenant=" + quote(tenant, safe="") if tenant is not None else "not-lap"
    return f"{settings.archive.dead_letter_prefix}/{owner}/date={moment:%Y-%m-%d}/shard={shard_id}/{sequence}.json"


def archive_line(record: Decoded, shard_id: str) -> bytes:
    """The event with its metadata, which also carries the IRIs the index needs of the item (so the index writer
    reads the metadata alone: lap.sinks.archive.read_metas)."""
    item = record.item
    meta = dict(record.meta, shard_id=shard_id, sequence_number=str(record.sequence), position=record.position,
                actor=iri_of(item.get("actor")), object=iri_of(item.get("object")))
    if record.raw_item is not None:  # the same bytes as orjson would make of the item, without making them
        return b'{"meta":' + orjson.dumps(meta) + b',"item":' + record.raw_item + b"}"
    return orjson.dumps({"meta": meta, "item": record.item})


class BatchWriter:
    """Writes a shard's batches; one per consumer, holding that consumer's lease and dedup state.

    A replay (`replay` = its id) goes through the same steps for events read
    again from the archive or the stream, but it holds no lease, no dedup state
    and moves no checkpoint: it is given only events that reconcile found
    stored nowhere (behind the shard's checkpoint, so the live consumer never
    reads them again), its manifest rows belong to the stream "replay:<id>" and
    its objects' keys end in "-r<id>"; it writes no receipts (the events have
    theirs) and counts no new acceptance. Running a replay twice changes
    nothing: the second finds nothing missing.
    """

    def __init__(self, settings: Settings, pool: asyncpg.Pool, s3: Any, shard_id: str, lease: Lease | None,
                 replay: str | None = None, dedup: DedupStore | None = None,
                 hash_range: tuple[int, int] | None = None,
                 forward: Callable[[list[Decoded]], Awaitable[None]] | None = None,
                 tombstones: Tombstones | None = None):
        if (lease is None) != (replay is not None):  # a live writer is fenced by its lease; a replay holds none
            raise ValueError("a BatchWriter takes a lease, or a replay id, not both and not neither")
        self.settings = settings
        self.pool = pool
        self.s3 = s3
        self.stream = settings.stream.name if replay is None else f"replay:{replay}"
        self.shard_id = shard_id
        self.lease = lease  # None for a replay
        self.replay = replay
        self.dedup_store = dedup
        # The shard's hash-key range, and how to put an event back into the stream for the shard that owns it
        # (`foreign`). Set for live consumers.
        self.hash_range = hash_range
        self.forward = forward
        self.tombstones = tombstones if tombstones is not None else Tombstones()
        self.written: set[str] = set()  # the keys the current attempt at a batch has put

    async def process_events(self, first: int, last: int, records: int, decoded: list[Decoded]) -> BatchResult:
        """Archive, aggregate and commit the events of the records `first`..`last` (`records` of them)."""
        if self.tombstones.version < 0:
            await self.refresh_tombstones()
        earlier: set[str] = set()  # objects an attempt wrote before it met a new tombstone
        for _ in range(10):
            self.written = set()
            try:
                result = await self._process_events(first, last, records, decoded)
            except TombstonesMoved:  # rolled back as a whole: filter the same events again
                log.info("shard %s: an erasure began while batch %s was written; writing it again", self.shard_id,
                         first)
                earlier |= self.written
                await self.refresh_tombstones()
                continue
            for key in sorted(earlier - self.written):  # held erased events, and this attempt wrote none there
                await self.s3.delete_object(Bucket=self.settings.archive.bucket, Key=key)
            return result
        raise RuntimeError(f"shard {self.shard_id}: batch {first} kept meeting new erasures")

    async def refresh_tombstones(self) -> None:
        async with self.pool.acquire() as conn:
            await self.tombstones.refresh(conn)

    async def _process_events(self, first: int, last: int, records: int, decoded: list[Decoded]) -> BatchResult:
        if self.tombstones.tenants:  # a deleted tenant's events: nothing of them is kept, not even a count
            decoded = [d for d in decoded if d.meta["tenant"] not in self.tombstones.tenants]
        foreign = self.foreign(decoded)
        kept, duplicate = self.dedup(decoded, foreign)
        duplicates = [d for d, dup in zip(decoded, duplicate) if dup]
        # events of an erased learner: read and counted (accepted, then erased), stored nowhere
        erased_flags = [False] * len(decoded)
        erased: list[Decoded] = []
        if self.tombstones:
            erased_flags = [not elsewhere and self.tombstones.erasure_of(r.meta) is not None
                            for r, elsewhere in zip(decoded, foreign)]
            if any(erased_flags):
                gone = {id(r) for r, flag in zip(decoded, erased_flags) if flag}
                erased = [r for r in kept if id(r) in gone]
                kept = [r for r in kept if id(r) not in gone]
        if self.replay is not None and not kept and not erased:
            return BatchResult(last, 0, len(duplicates))
        if any(foreign):  # before the commit moves the checkpoint past them: never lost, at worst sent twice
            await self.forward([d for d, f in zip(decoded, foreign) if f])
        stored = fingerprints([r.key for r in kept + erased])  # a resend of an erased event is a duplicate
        keys = await self.archive(kept, decoded, duplicate, foreign, first, last, erased_flags)
        aggregates = aggregate_records([{"meta": r.meta, "item": r.item} for r in kept])
        for attempt in range(5):
            started = time.monotonic()
            try:
                await self.commit(first, last, records, decoded, kept, duplicates, keys, aggregates, stored, erased)
                metrics.batch_commit_seconds().observe(time.monotonic() - started, tags={"shard": self.shard_id})
                break
            except asyncpg.exceptions.DeadlockDetectedError:  # rolled back as a whole: simply commit again
                log.warning("shard %s: batch %s hit a deadlock; committing it again", self.shard_id, first)
                await asyncio.sleep(0.1 * (attempt + 1))
        else:
            raise RuntimeError(f"shard {self.shard_id}: batch {first} kept deadlocking")
        if self.dedup_store is not None:
            self.dedup_store.add(stored, [r.received_at for r in kept + erased])
        return BatchResult(last, len(kept), len(duplicates))

    def foreign(self, decoded: list[Decoded]) -> list[bool]:
        """Which events belong to another shard: their learner's hash key is outside this shard's range.

        Ingest groups a request's events by its shard map; for a moment after a
        split or merge that map is stale, and a record can land on a shard that
        does not own all of its learners. Dedup state is per shard, so a later
        resend of such an event would go to its own shard and be stored twice:
        the consumer puts it back into the stream for that shard instead.
        """
        if self.hash_range is None:
            return [False] * len(decoded)
        low, high = self.hash_range
        out = []
        for record in decoded:
            key = partition_key_for(record.meta.get("learner") or record.meta["event_id"])
            out.append(not low <= hash_key(key) <= high)
        return out

    def dedup(self, decoded: list[Decoded], foreign: list[bool]) -> tuple[list[Decoded], list[bool]]:
        """The events to keep, and for each decoded copy whether it is a duplicate (in this batch, or stored before).

        Foreign events are neither: their own shard decides.
        """
        seen_here: set[tuple[str, str]] = set()
        first_copy = []
        for record, elsewhere in zip(decoded, foreign):
            key = record.key
            first_copy.append(not elsewhere and key not in seen_here)
            if not elsewhere:
                seen_here.add(key)
        candidates = [r for r, first in zip(decoded, first_copy) if first]
        if self.dedup_store is None or not candidates:  # a replay: given only what is stored nowhere
            known = np.zeros(len(candidates), dtype=bool)
        else:
            known = self.dedup_store.state.contains(fingerprints([r.key for r in candidates]))
        kept: list[Decoded] = []
        duplicate: list[bool] = []
        it = iter(known)
        for record, first, elsewhere in zip(decoded, first_copy, foreign):
            dup = False if elsewhere else (not first or bool(next(it)))
            duplicate.append(dup)
            if first and not dup:
                kept.append(record)
        return kept, duplicate

    async def archive(self, kept: list[Decoded], decoded: list[Decoded], duplicate: list[bool], foreign: list[bool],
                      first: int, last: int, erased: list[bool]) -> dict[str, tuple[str, datetime, int, int, list[int]]]:
        """Put one archive object and one receipt object per tenant and hour; returns the archive keys ->
        (tenant, hour, records, bytes, the hashes of its learners)."""
        groups: dict[tuple[str, datetime], tuple[list[bytes], set[int]]] = {}
        hashes: dict[str, int] = {}
        for record in kept:
            lines, learners = groups.setdefault((record.meta["tenant"], hour_of(record.received_at)), ([], set()))
            lines.append(archive_line(record, self.shard_id))
            learner = record.meta.get("learner") or record.meta["event_id"]
            learners.add(hashes.get(learner) or hashes.setdefault(learner, learner_hash32(learner)))
        objects: dict[str, tuple[str, datetime, int, int, list[int]]] = {}
        puts = []
        for (tenant, hour), (lines, learners) in groups.items():
            key = archive_key(self.settings, tenant, hour, self.shard_id, first, last, self.replay)
            body = pack_lines(lines)
            objects[key] = (tenant, hour, len(lines), len(body), sorted(learners))
            self.written.add(key)
            puts.append(put_object(self.s3, self.settings, key, body))
        if self.replay is None:  # what was read from the stream, duplicates included
            puts.extend(self.receipt_puts(decoded, duplicate, foreign, first, last, erased))
        await asyncio.gather(*puts)
        return objects

    def receipt_puts(self, decoded: list[Decoded], duplicate: list[bool], foreign: list[bool], first: int,
                     last: int, erased: list[bool] | None = None) -> list[Awaitable]:
        """The puts of the receipt objects of records `first`..`last`: one per tenant and hour."""
        copies: dict[tuple[str, datetime], tuple[list[Decoded], list[bool], list[bool], list[bool]]] = {}
        for record, dup, elsewhere, gone in zip(decoded, duplicate, foreign, erased or [False] * len(decoded)):
            group = copies.setdefault((record.meta["tenant"], hour_of(record.received_at)), ([], [], [], []))
            group[0].append(record)
            group[1].append(dup)
            group[2].append(elsewhere)
            group[3].append(gone)
        puts = []
        for (tenant, hour), (records, dups, forwarded, gone) in copies.items():
            minutes = [r.received_at.astimezone(timezone.utc).minute for r in records]
            key = receipt_key(self.settings.archive.receipts_prefix, tenant, hour, self.shard_id, first, last,
                              (min(minutes), max(minutes)))
            self.written.add(key)
            puts.append(self.s3.put_object(Bucket=self.settings.archive.bucket, Key=key,
                                           Body=encode_receipts(tenant, self.shard_id, first, last, records, dups,
                                                                forwarded, gone),
                                           ContentType="application/json", ContentEncoding="gzip"))
        return puts

    async def dead_letter(self, record: StreamRecord, decoded: list[Decoded] | None, reason: str) -> BatchResult:
        """Keep a record that cannot be processed in S3, count it, and move the checkpoint past it.

        Its events (if it has LAP's format) get receipts like any copy read, so
        reconcile knows them by id: accepted, stored nowhere, and dead-lettered
        rather than missing while the `dead_letters` row is open; a replay
        stores them once the cause is fixed.
        """
        sequence = record.sequence
        tenant = decoded[0].meta["tenant"] if decoded else None
        received = decoded[0].received_at if decoded else None
        key = dead_letter_key(self.settings, tenant, received or datetime.now(timezone.utc), self.shard_id, sequence)
        kept_as_read = {"stream": self.settings.stream.name, "shard_id": self.shard_id,
                        "sequence_number": str(sequence), "reason": reason,
                        "data_base64": base64.b64encode(record.data).decode()}
        puts = [self.s3.put_object(Bucket=self.settings.archive.bucket, Key=key, Body=orjson.dumps(kept_as_read),
                                   ContentType="application/json")]
        if decoded:
            puts.extend(self.receipt_puts(decoded, [False] * len(decoded), [False] * len(decoded), sequence, sequence))
        await asyncio.gather(*puts)
        read = [r for r in (decoded or []) if "forwarded_from" not in r.meta]
        async with self.pool.acquire() as conn, conn.transaction():
            await self.lease.fence(conn)
            await conn.execute(
                """INSERT INTO dead_letters (stream, shard_id, sequence_number, tenant, sensor, received_at, events,
                                             reason, key)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                   ON CONFLICT (stream, shard_id, sequence_number) DO UPDATE SET reason = excluded.reason""",
                self.stream, self.shard_id, Decimal(sequence), tenant,
                decoded[0].meta.get("sensor") if decoded else None, received, len(decoded or []), reason, key)
            await stage_tally(self.shard_id, [], [], read).write(conn)
            await self.lease.advance(conn, sequence, received)
        metrics.dead_letters().inc(tags={"shard": self.shard_id})
        log.error("shard %s: record %s dead-lettered (%d events) to %s: %s", self.shard_id, sequence,
                  len(decoded or []), key, reason)
        return BatchResult(sequence, 0, 0)

    async def commit(self, first: int, last: int, count: int, decoded: list[Decoded], kept: list[Decoded],
                     duplicates: list[Decoded], keys: dict[str, tuple[str, datetime, int, int, list[int]]],
                     aggregates: Aggregates, stored: np.ndarray, erased: list[Decoded]) -> None:
        describes = sum(1 for r in kept if r.meta.get("kind") == "entity")
        newest = max((r.received_at for r in decoded), default=None)
        async with self.pool.acquire() as conn, conn.transaction():
            if self.lease is not None:
                await self.lease.fence(conn)
            await self.tombstones.confirm(conn)
            batch_id = await conn.fetchval(
                """INSERT INTO batches (stream, shard_id, first_seq, last_seq, records, events, describes, duplicates,
                                        fingerprints, max_received_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id""",
                self.stream, self.shard_id, Decimal(first), Decimal(last), count, len(kept) - describes,
                describes, len(duplicates), to_bytes(stored) if len(stored) else None,
                max((r.received_at for r in kept), default=newest))
            if keys:
                await conn.executemany(
                    """INSERT INTO archive_objects (key, batch_id, tenant, received_hour, records, bytes, learners)
                       VALUES ($1, $2, $3, $4, $5, $6, $7)""",
                    [(key, batch_id, *info) for key, info in keys.items()])
            await write_aggregates(conn, aggregates)
            # every copy read is accepted, but for copies another shard's consumer forwarded: counted there already
            read = [] if self.replay is not None else [r for r in decoded if "forwarded_from" not in r.meta]
            await stage_tally(self.shard_id, kept, duplicates if read else [], read, erased).write(conn)
            if erased and self.replay is not None:  # their receipts name them: reconcile knows them as erased by this
                await conn.executemany(
                    """INSERT INTO erased_events (tenant, fingerprint, erasure_id, received_at, sensor, shard_id)
                       VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, fingerprint) DO NOTHING""",
                    [(r.meta["tenant"], signed64(int(fp)), self.tombstones.erasure_of(r.meta), r.received_at,
                      r.meta.get("sensor") or "", self.shard_id)
                     for r, fp in zip(erased, fingerprints([r.key for r in erased]))])
            if self.lease is not None:
                await self.lease.advance(conn, last, newest)


def stage_tally(shard_id: str, kept: list[Decoded], duplicates: list[Decoded], read: list[Decoded],
                erased: list[Decoded] = ()) -> StageTally:
    """Audit counters of a batch: every copy read from the stream is accepted; every kept record is archived and
    aggregated (a describe too: the stage holds it, though it adds to no figure); describes and duplicates are
    also counted apart; events of erased learners are counted erased, and stored nowhere."""
    tally = StageTally()
    for records, stage in ((read, "accepted"), (kept, "archived"), (kept, "aggregated"),
                           ([r for r in kept if r.meta.get("kind") == "entity"], "describes"),
                           (duplicates, "duplicates"), (erased, "erased")):
        for record in records:
            tally.count(record.meta["tenant"], record.meta.get("sensor"), shard_id, record.received_at, stage)
    return tally


async def write_aggregates(conn: asyncpg.Connection, agg: Aggregates) -> None:
    """Add a batch's figures to the aggregate tables (sums add, max/min keep the extreme).

    Consumers of different shards update the same course rows: every statement
    takes its row locks in key order (ORDER BY), so two commits wait for each
    other instead of deadlocking.

    Each column list goes as one array: the times are naive UTC, hence AT TIME
    ZONE 'UTC', and a NaN score_max means no score, hence NULLIF.
    """
    if agg.learner_days["tenant"]:
        await conn.execute(
            """INSERT INTO learner_days AS t (tenant, learner, course, day, events, submissions, score_count,
                                              score_sum, score_max, max_score_sum, time_on_task_s,
                                              first_active, last_active)
               SELECT tenant, learner, course, day, events, submissions, score_count, score_sum,
                      NULLIF(score_max, 'NaN'::float8), max_score_sum, time_on_task_s,
                      first_active AT TIME ZONE 'UTC', last_active AT TIME ZONE 'UTC'
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::date[], $5::bigint[], $6::bigint[],
                             $7::bigint[], $8::float8[], $9::float8[], $10::float8[], $11::float8[],
                             $12::timestamp[], $13::timestamp[])
                      AS x(tenant, learner, course, day, events, submissions, score_count, score_sum, score_max,
                           max_score_sum, time_on_task_s, first_active, last_active)
                ORDER BY tenant, learner, course, day
               ON CONFLICT (tenant, learner, course, day) DO UPDATE SET
                   events = t.events + excluded.events,
                   submissions = t.submissions + excluded.submissions,
                   score_count = t.score_count + excluded.score_count,
                   score_sum = t.score_sum + excluded.score_sum,
                   score_max = greatest(t.score_max, excluded.score_max),
                   max_score_sum = t.max_score_sum + excluded.max_score_sum,
                   time_on_task_s = t.time_on_task_s + excluded.time_on_task_s,
                   first_active = least(t.first_active, excluded.first_active),
                   last_active = greatest(t.last_active, excluded.last_active)""",
            *agg.learner_days.values())
    if agg.learner_day_actions["tenant"]:
        await conn.execute(
            """INSERT INTO learner_day_actions AS t (tenant, learner, course, day, action, count)
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::date[], $5::text[], $6::bigint[])
                ORDER BY 1, 2, 3, 4, 5
               ON CONFLICT (tenant, learner, course, day, action) DO UPDATE SET count = t.count + excluded.count""",
            *agg.learner_day_actions.values())
    if agg.course_days["tenant"]:
        await conn.execute(
            """INSERT INTO course_days AS t (tenant, course, day, events)
               SELECT * FROM unnest($1::text[], $2::text[], $3::date[], $4::bigint[])
                ORDER BY 1, 2, 3
               ON CONFLICT (tenant, course, day) DO UPDATE SET events = t.events + excluded.events""",
            *agg.course_days.values())
    if agg.course_hours["tenant"]:
        await conn.execute(
            """INSERT INTO course_hours AS t (tenant, course, hour, events)
               SELECT tenant, course, hour AT TIME ZONE 'UTC', events
                 FROM unnest($1::text[], $2::text[], $3::timestamp[], $4::bigint[]) AS x(tenant, course, hour, events)
                ORDER BY 1, 2, 3
               ON CONFLICT (tenant, course, hour) DO UPDATE SET events = t.events + excluded.events""",
            *agg.course_hours.values())


def negated(agg: Aggregates) -> Aggregates:
    """Figures that, written with write_aggregates, take `agg` back out of the tables: the sums negated. The
    extremes (score_max, first_active, last_active) cannot be taken back: only an erasure, which then deletes the
    learner's rows altogether, uses this."""
    days = dict(agg.learner_days)
    for name in ("events", "submissions", "score_count", "score_sum", "max_score_sum", "time_on_task_s"):
        days[name] = [-v for v in days[name]]
    days["score_max"] = [float("nan")] * len(days["score_max"])
    actions = dict(agg.learner_day_actions, count=[-v for v in agg.learner_day_actions["count"]])
    course_days = dict(agg.course_days, events=[-v for v in agg.course_days["events"]])
    course_hours = dict(agg.course_hours, events=[-v for v in agg.course_hours["events"]])
    return Aggregates(days, actions, course_days, course_hours)
