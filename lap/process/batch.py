"""One batch of a shard, from stream records to a committed manifest.

The order is what makes a crash harmless (DESIGN.md, "Data flow"):

1. dedup against the committed ids (a read: nothing is claimed yet);
2. archive: one gzip JSON-lines object per tenant and hour, under a key made of
   the batch's first and last sequence numbers, so a retried batch writes the
   same keys;
3. aggregate with numpy;
4. commit, in ONE transaction: the lease check, the manifest and its archive
   objects, the dedup rows, the aggregates, the audit counters and the checkpoint.

An object written in step 2 whose transaction never commits is an orphan: no
manifest names it, so nothing reads it, and the sweeper removes it.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import asyncpg
import orjson

from lap import metrics
from lap.process.aggregate import Aggregates, aggregate_records
from lap.settings import Settings
from lap.stream import record_format

log = logging.getLogger("lap.process")

GZIP_LEVEL = 3  # ~4x smaller than the JSON at a few ms per MB; the archive is write-mostly


class LeaseLost(Exception):
    """Another consumer holds this shard now; this one must stop without committing."""


class DedupRace(Exception):
    """An id of this batch was committed elsewhere between the dedup read and the commit."""


@dataclass(slots=True)
class Decoded:
    """An event (or describe) with its LAP metadata, plus where the stream put it: record and position."""

    sequence: int
    position: int
    meta: dict[str, Any]
    item: dict[str, Any]
    received_at: datetime

    @property
    def key(self) -> tuple[str, str]:
        return self.meta["tenant"], self.meta["event_id"]


@dataclass
class BatchResult:
    last_seq: int
    kept: int  # archived and aggregated (events and describes)
    duplicates: int


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def decode_record(record: dict[str, Any]) -> list[Decoded]:
    """The events of one stream record (a GetRecords dict), in position order. Raises NotLapRecord."""
    sequence = int(record["SequenceNumber"])
    events = record_format.decode(record["Data"])
    decoded: list[Decoded] = []
    received_text = None
    received = None
    try:
        for position, (meta, item) in enumerate(events):
            meta["tenant"], meta["event_id"]  # noqa: B018 - both are required
            if meta["received_at"] != received_text:  # one per record in format 1: parsed once
                received_text = meta["received_at"]
                received = parse_time(received_text)
            decoded.append(Decoded(sequence, position, meta, item, received))
    except (KeyError, TypeError, ValueError) as exc:
        raise record_format.NotLapRecord(f"an event without LAP's metadata: {exc!r}") from None
    return decoded


def decode(records: list[dict[str, Any]]) -> tuple[list[Decoded], int]:
    """The events of stream records; the count of records that are not LAP's (logged and skipped)."""
    decoded: list[Decoded] = []
    bad = 0
    for record in records:
        try:
            decoded.extend(decode_record(record))
        except record_format.NotLapRecord as exc:
            bad += 1
            log.error("record %s of the stream is not a LAP record; skipped: %s", record.get("SequenceNumber"), exc)
    return decoded, bad


def hour_of(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def minute_of(moment: datetime) -> datetime:
    """The audit counters' bucket: reconcile counts whole minutes from them."""
    return moment.astimezone(timezone.utc).replace(second=0, microsecond=0)


def archive_key(settings: Settings, tenant: str, hour: datetime, shard_id: str, first: int, last: int,
                replay: str | None = None) -> str:
    suffix = "" if replay is None else f"-r{replay}"
    return (f"{settings.archive.prefix}/tenant={quote(tenant, safe='')}/date={hour:%Y-%m-%d}/hour={hour:%H}/"
            f"shard={shard_id}/{first}-{last}{suffix}.jsonl.gz")


def archive_line(record: Decoded, shard_id: str) -> bytes:
    meta = dict(record.meta, shard_id=shard_id, sequence_number=str(record.sequence), position=record.position)
    return orjson.dumps({"meta": meta, "item": record.item})


class BatchWriter:
    """Writes a shard's batches; one per consumer, holding that consumer's lease epoch.

    A replay (`replay` = its id) goes through the same steps for records read
    again from the archive or the stream, but it holds no lease and moves no
    checkpoint: its manifest rows belong to the stream "replay:<id>", its
    objects' keys end in "-r<id>", and ids already committed are simply skipped
    (not counted as new duplicates), so running a replay twice changes nothing.
    """

    def __init__(self, settings: Settings, pool: asyncpg.Pool, s3: Any, shard_id: str, epoch: int | None,
                 replay: str | None = None):
        self.settings = settings
        self.pool = pool
        self.s3 = s3
        self.stream = settings.stream.name if replay is None else f"replay:{replay}"
        self.shard_id = shard_id
        self.epoch = epoch
        self.replay = replay

    async def process(self, records: list[dict[str, Any]]) -> BatchResult:
        """Archive, aggregate and commit one batch of GetRecords records (in stream order)."""
        decoded, _ = decode(records)  # records that are not LAP's are logged there and skipped
        return await self.process_events(int(records[0]["SequenceNumber"]), int(records[-1]["SequenceNumber"]),
                                         len(records), decoded)

    async def process_events(self, first: int, last: int, records: int, decoded: list[Decoded]) -> BatchResult:
        """The same for events already decoded, from the records `first`..`last` (`records` of them)."""
        for attempt in range(5):
            kept, duplicates = await self.dedup(decoded)
            if self.replay is not None and not kept:
                return BatchResult(last, 0, len(duplicates))
            keys = await self.archive(kept, first, last)
            aggregates = aggregate_records([{"meta": r.meta, "item": r.item} for r in kept])
            started = time.monotonic()
            try:
                await self.commit(first, last, records, kept, duplicates, keys, aggregates)
                metrics.batch_commit_seconds().observe(time.monotonic() - started, tags={"shard": self.shard_id})
            except DedupRace:
                log.warning("shard %s: an id of batch %s was committed meanwhile; redoing it", self.shard_id, first)
                await asyncio.sleep(0.1 * (attempt + 1))
                continue
            except asyncpg.exceptions.DeadlockDetectedError:  # rolled back as a whole: simply commit again
                log.warning("shard %s: batch %s hit a deadlock; committing it again", self.shard_id, first)
                await asyncio.sleep(0.1 * (attempt + 1))
                continue
            return BatchResult(last, len(kept), len(duplicates))
        raise RuntimeError(f"shard {self.shard_id}: batch {first} kept racing with another consumer")

    async def dedup(self, decoded: list[Decoded]) -> tuple[list[Decoded], list[Decoded]]:
        """Split the batch into the records to keep and the duplicates (in this batch or committed)."""
        seen_here: set[tuple[str, str]] = set()
        unique: list[Decoded] = []
        duplicates: list[Decoded] = []
        for record in decoded:
            if record.key in seen_here:
                duplicates.append(record)
            else:
                seen_here.add(record.key)
                unique.append(record)
        if not unique:
            return unique, duplicates
        window = timedelta(seconds=self.settings.process.dedup_window_s)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT s.tenant, s.event_id, s.received_at, s.shard_id, s.sequence_number, s.position
                     FROM seen_events s
                     JOIN unnest($1::text[], $2::text[]) AS b(tenant, event_id) USING (tenant, event_id)""",
                [r.meta["tenant"] for r in unique], [r.meta["event_id"] for r in unique])
        committed = {(row["tenant"], row["event_id"]): row for row in rows}
        kept: list[Decoded] = []
        for record in unique:
            before = committed.get(record.key)
            if before is None or record.received_at - before["received_at"] >= window:
                kept.append(record)
            elif (before["shard_id"] == self.shard_id and int(before["sequence_number"]) == record.sequence
                  and before["position"] == record.position):
                continue  # this very record is committed already (a replay got there first): not a duplicate
            else:
                duplicates.append(record)
        return kept, duplicates

    async def archive(self, kept: list[Decoded], first: int, last: int) -> dict[str, tuple[str, datetime, int, int]]:
        """Put one object per tenant and hour; returns key -> (tenant, hour, records, bytes)."""
        groups: dict[tuple[str, datetime], list[bytes]] = {}
        for record in kept:
            groups.setdefault((record.meta["tenant"], hour_of(record.received_at)), []).append(
                archive_line(record, self.shard_id))
        objects: dict[str, tuple[str, datetime, int, int]] = {}
        puts = []
        for (tenant, hour), lines in groups.items():
            key = archive_key(self.settings, tenant, hour, self.shard_id, first, last, self.replay)
            body = gzip.compress(b"\n".join(lines) + b"\n", compresslevel=GZIP_LEVEL, mtime=0)
            objects[key] = (tenant, hour, len(lines), len(body))
            puts.append(self.s3.put_object(Bucket=self.settings.archive.bucket, Key=key, Body=body,
                                           ContentType="application/x-ndjson", ContentEncoding="gzip"))
        await asyncio.gather(*puts)
        return objects

    async def commit(self, first: int, last: int, count: int, kept: list[Decoded], duplicates: list[Decoded],
                     keys: dict[str, tuple[str, datetime, int, int]], aggregates: Aggregates) -> None:
        window = timedelta(seconds=self.settings.process.dedup_window_s)
        describes = sum(1 for r in kept if r.meta.get("kind") == "entity")
        async with self.pool.acquire() as conn, conn.transaction():
            if self.replay is None:
                epoch = await conn.fetchval(
                    "SELECT lease_epoch FROM shard_checkpoints WHERE stream = $1 AND shard_id = $2 FOR UPDATE",
                    self.stream, self.shard_id)
                if epoch != self.epoch:
                    raise LeaseLost(f"shard {self.shard_id}: lease epoch is {epoch}, this consumer holds {self.epoch}")
            batch_id = await conn.fetchval(
                """INSERT INTO batches (stream, shard_id, first_seq, last_seq, records, events, describes, duplicates)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id""",
                self.stream, self.shard_id, Decimal(first), Decimal(last), count, len(kept) - describes,
                describes, len(duplicates))
            if kept:
                claimed = await conn.fetchval(
                    """WITH claimed AS (
                         INSERT INTO seen_events AS s (tenant, event_id, received_at, batch_id, shard_id,
                                                       sequence_number, position)
                         SELECT t, e, r, $4, $5, q, p
                           FROM unnest($1::text[], $2::text[], $3::timestamptz[], $6::numeric[], $8::int[])
                                AS b(t, e, r, q, p)
                         ON CONFLICT (tenant, event_id) DO UPDATE
                            SET received_at = excluded.received_at, batch_id = excluded.batch_id,
                                shard_id = excluded.shard_id, sequence_number = excluded.sequence_number,
                                position = excluded.position
                          WHERE s.received_at <= excluded.received_at - $7::interval
                         RETURNING 1)
                       SELECT count(*) FROM claimed""",
                    [r.meta["tenant"] for r in kept], [r.meta["event_id"] for r in kept],
                    [r.received_at for r in kept], batch_id, self.shard_id,
                    _sequences(kept), window, [r.position for r in kept])
                if claimed != len(kept):
                    raise DedupRace()
            if keys:
                await conn.executemany(
                    """INSERT INTO archive_objects (key, batch_id, tenant, received_hour, records, bytes)
                       VALUES ($1, $2, $3, $4, $5, $6)""",
                    [(key, batch_id, *info) for key, info in keys.items()])
            await write_aggregates(conn, aggregates)
            await conn.executemany(ADD_STAGE_COUNT,
                                   stage_rows(self.shard_id, kept, duplicates if self.replay is None else []))
            if self.replay is not None:
                return
            await conn.execute(
                """UPDATE shard_checkpoints
                      SET sequence_number = $3, lease_expires = now() + $4::interval, updated_at = now()
                    WHERE stream = $1 AND shard_id = $2""",
                self.stream, self.shard_id, Decimal(last), timedelta(seconds=self.settings.process.lease_ttl_s))


def _sequences(kept: list[Decoded]) -> list[Decimal]:
    """Each event's record sequence number as a Decimal, made once per record (a record holds many events)."""
    out: list[Decimal] = []
    last_seq, last_dec = None, None
    for r in kept:
        if r.sequence != last_seq:
            last_seq, last_dec = r.sequence, Decimal(r.sequence)
        out.append(last_dec)  # type: ignore[arg-type]
    return out


ADD_STAGE_COUNT = """
INSERT INTO stage_counts (tenant, sensor, shard_id, received_minute, stage, events)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (tenant, received_minute, sensor, shard_id, stage)
DO UPDATE SET events = stage_counts.events + excluded.events
"""


def stage_rows(shard_id: str, kept: list[Decoded], duplicates: list[Decoded]) -> list[tuple]:
    """Audit counters of a batch: every kept record is archived and aggregated (a describe too:
    the stage holds it, though it adds to no figure); describes and duplicates are also counted apart."""
    counts: dict[tuple, int] = {}

    def add(record: Decoded, stage: str) -> None:
        key = (record.meta["tenant"], record.meta.get("sensor") or "", shard_id, minute_of(record.received_at), stage)
        counts[key] = counts.get(key, 0) + 1

    for record in kept:
        add(record, "archived")
        add(record, "aggregated")
        if record.meta.get("kind") == "entity":
            add(record, "describes")
    for record in duplicates:
        add(record, "duplicates")
    return sorted((*key, n) for key, n in counts.items())  # in key order: no deadlock between shards


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
