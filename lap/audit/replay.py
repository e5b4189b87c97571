"""Replay: puts the events reconcile finds missing back into each stage, through the live writers.

- aggregate (and archive): ids with no committed dedup row are read again, from
  the archive (any object under the window's tenant-and-hour prefixes, orphans
  included: a batch that never committed may have left one) or from the stream
  (by the shard and sequence number on their receipts), and go through the
  consumers' BatchWriter in replay mode: dedup, archive, aggregate and commit.
- archive: an object a manifest names but S3 no longer has is written again
  from the stream, with the same key and the same lines.
- index: ids missing from the index are read from their archive objects and
  bulk-indexed (the document id is the event id).

Every step skips what is already there, so a second replay changes nothing.
"""

from __future__ import annotations

import gzip
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import orjson

from lap.audit.reconcile import Reconciler, Window
from lap.process.batch import GZIP_LEVEL, BatchWriter, Decoded, archive_line, decode_record, hour_of, parse_time
from lap.process.index_writer import bulk_index
from lap.settings import Settings
from lap.stream.record_format import NotLapRecord

log = logging.getLogger("lap.replay")

STAGES = ("archive", "aggregate", "index")
ALL_IDS = 10_000_000


class ReplayError(Exception):
    """The replay cannot do what was asked (say, rebuild an archive object from the archive)."""


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
        oldest = datetime.now(timezone.utc) - timedelta(seconds=self.settings.process.dedup_window_s) \
            + timedelta(hours=1)
        if window.start < oldest:
            # beyond the dedup window the committed ids are forgotten: a replay would count events twice
            raise ReplayError(f"a replay must start after {oldest:%Y-%m-%dT%H:%M}Z: older events are past the dedup "
                              "window (process.dedup_window_s), so LAP can no longer tell which are stored")
        reconciler = Reconciler(self.settings, self.pool, self.s3, self.search)
        before = await reconciler.run(window, with_ids=True, limit=ALL_IDS)
        done: dict[str, int] = {}
        if "aggregate" in stages or "archive" in stages:
            done["restored"] = await self.restore(replay_id, window, before.missing_ids["aggregate"], source)
        if "archive" in stages:
            done["objects_rewritten"] = await self.rewrite_objects(window, source)
        if "index" in stages:
            middle = await reconciler.run(window, with_ids=True, limit=ALL_IDS)
            done["indexed"] = await self.reindex(window.tenant, middle.missing_ids["index"])
        after = await reconciler.run(window)
        return {"replayed": done, "before": before.as_dict() | {"missing_ids": None}, "after": after.as_dict()}

    # --- aggregate: events with no committed batch -------------------------------------------

    async def restore(self, replay_id: str, window: Window, ids: list[str], source: str) -> int:
        if not ids:
            return 0
        wanted = set(ids)
        events = await (self.from_archive(window, wanted) if source == "archive" else self.from_stream(window, wanted))
        by_shard: dict[str, list[Decoded]] = defaultdict(list)
        for shard, event in events:
            by_shard[shard].append(event)
        restored = 0
        total = len(events)
        for shard, shard_events in sorted(by_shard.items()):
            shard_events.sort(key=lambda e: (e.sequence, e.position))
            writer = BatchWriter(self.settings, self.pool, self.s3, shard, None, replay=replay_id)
            result = await writer.process_events(shard_events[0].sequence, shard_events[-1].sequence,
                                                 len({e.sequence for e in shard_events}), shard_events)
            restored += result.kept
            self.progress("aggregate", restored, total)
        missing = len(wanted) - len(events)
        if missing:
            log.warning("replay %s: %d of %d ids were not found in the %s", replay_id, missing, len(wanted), source)
        return restored

    async def from_archive(self, window: Window, wanted: set[str]) -> list[tuple[str, Decoded]]:
        """Events of any object (committed or orphaned) under the window's hours, for the wanted ids."""
        found: dict[str, tuple[str, Decoded]] = {}
        paginator = self.s3.get_paginator("list_objects_v2")
        hour = hour_of(window.start)
        while hour < window.end:
            prefix = (f"{self.settings.archive.prefix}/tenant={quote(window.tenant, safe='')}/"
                      f"date={hour:%Y-%m-%d}/hour={hour:%H}/")
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

    async def from_stream(self, window: Window, wanted: set[str]) -> list[tuple[str, Decoded]]:
        """Each wanted id's event, read at the shard, record and position of its first receipt."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT DISTINCT ON (event_id) event_id, shard_id, sequence_number, position FROM receipts
                    WHERE tenant = $1 AND received_at >= $2 AND received_at < $3 AND event_id = ANY($4)
                    ORDER BY event_id, received_at""", window.tenant, window.start, window.end, list(wanted))
        found = []
        records = StreamRecords(self)
        for n, row in enumerate(rows, 1):
            event = await records.event(row["shard_id"], str(row["sequence_number"]), row["position"])
            if event is not None and event.meta["event_id"] == row["event_id"]:
                found.append((row["shard_id"], event))
            self.progress("read stream", n, len(rows))
        return found

    async def stream_record(self, shard_id: str, sequence: str) -> dict[str, Any] | None:
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
        return {"SequenceNumber": sequence, "Data": records[0]["Data"]}

    # --- archive: objects a manifest names that S3 lost --------------------------------------

    async def rewrite_objects(self, window: Window, source: str) -> int:
        async with self.pool.acquire() as conn:
            objects = await conn.fetch(
                """SELECT DISTINCT o.key, o.batch_id, o.received_hour, b.shard_id, b.first_seq, b.last_seq
                     FROM receipts r
                     JOIN seen_events s ON s.tenant = r.tenant AND s.event_id = r.event_id
                     JOIN archive_objects o ON o.batch_id = s.batch_id AND o.tenant = s.tenant
                          AND o.received_hour = date_trunc('hour', s.received_at, 'UTC')
                     JOIN batches b ON b.id = o.batch_id
                    WHERE r.tenant = $1 AND r.received_at >= $2 AND r.received_at < $3""",
                window.tenant, window.start, window.end)
        present = await Reconciler(self.settings, self.pool, self.s3, self.search)._keys_in_s3(
            {o["key"] for o in objects})
        lost = [o for o in objects if o["key"] not in present]
        if lost and source != "stream":
            raise ReplayError(f"{len(lost)} archive objects are gone from S3; only the stream can rebuild them "
                              "(replay with source 'stream')")
        for n, obj in enumerate(lost, 1):
            await self.rebuild_object(window.tenant, obj)
            async with self.pool.acquire() as conn:
                await conn.execute("DELETE FROM lost_archive_objects WHERE key = $1", obj["key"])
            self.progress("archive", n, len(lost))
        return len(lost)

    async def rebuild_object(self, tenant: str, obj) -> None:
        """The same lines as the lost object: the batch's committed events of this tenant and hour."""
        async with self.pool.acquire() as conn:
            kept = await conn.fetch(
                """SELECT shard_id, sequence_number, position FROM seen_events
                    WHERE tenant = $1 AND batch_id = $2 AND date_trunc('hour', received_at, 'UTC') = $3
                    ORDER BY sequence_number, position""", tenant, obj["batch_id"], obj["received_hour"])
        records = StreamRecords(self)
        lines = []
        for row in kept:
            event = await records.event(row["shard_id"], str(row["sequence_number"]), row["position"])
            if event is None:
                raise ReplayError(f"event {row['sequence_number']}/{row['position']} of {obj['key']} is no longer "
                                  "in the stream")
            lines.append(archive_line(event, obj["shard_id"]))
        body = gzip.compress(b"\n".join(lines) + b"\n", compresslevel=GZIP_LEVEL, mtime=0)
        await self.s3.put_object(Bucket=self.settings.archive.bucket, Key=obj["key"], Body=body,
                                 ContentType="application/x-ndjson", ContentEncoding="gzip")

    # --- index ---------------------------------------------------------------------------------

    async def reindex(self, tenant: str, ids: list[str]) -> int:
        if not ids:
            return 0
        async with self.pool.acquire() as conn:
            keys = [r["key"] for r in await conn.fetch(
                """SELECT DISTINCT o.key FROM seen_events s
                     JOIN archive_objects o ON o.batch_id = s.batch_id AND o.tenant = s.tenant
                          AND o.received_hour = date_trunc('hour', s.received_at, 'UTC')
                    WHERE s.tenant = $1 AND s.event_id = ANY($2)""", tenant, ids)]
        wanted = set(ids)
        lines = []
        for key in keys:
            lines += [line for line in await self.read_object(key) if line["meta"]["event_id"] in wanted]
        indexed = 0
        size = self.settings.process.index_batch_docs
        for start in range(0, len(lines), size):
            ok, refused = await bulk_index(self.search, self.settings, lines[start:start + size])
            indexed += len(ok)
            for line, status, reason in refused:
                log.error("replay: %s refused by the index (%s): %s", line["meta"]["event_id"], status, reason)
            self.progress("index", indexed, len(lines))
        return indexed

    async def read_object(self, key: str) -> list[dict[str, Any]]:
        reply = await self.s3.get_object(Bucket=self.settings.archive.bucket, Key=key)
        async with reply["Body"] as body:
            data = await body.read()
        return [orjson.loads(line) for line in gzip.decompress(data).splitlines() if line]
