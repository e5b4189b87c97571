"""The audit trail's two records of acceptance: ingest's counters, and the receipt objects of the stream.

- Ingest counts what it acknowledged to sensors, per tenant, sensor, shard and
  minute (`AcknowledgedCounts`, stage `acknowledged`), flushed to Postgres every
  half second: a row per minute, never per event.
- Each shard consumer writes, before it commits a batch, one **receipt object**
  per tenant and hour of the batch: every copy of every event it read from the
  stream (duplicates included, flagged), with its record, position, receipt
  time and request. The stream is durable before a sensor gets its 200, so the
  receipts are recovered from it whatever happens to a replica (a replica that
  dies only loses its last half second of counters, and the consumers' own
  `accepted` counts, committed with each batch, cover that). The object's key
  is made of the batch's first and last sequence numbers: a batch read again
  after a crash writes the same key, and overlapping re-reads are told apart by
  (shard, record, position).

Receipt object: gzip of one JSON object, columns of equal length (plus the
lookup lists they index), so that reconcile loads an hour of them vectorised.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import asyncpg
import numpy as np
import orjson

from lap.audit.tombstones import erased_id
from lap.buckets import minute_of

log = logging.getLogger("lap.receipts")

FORMAT = 1
# The audit counters (stage_counts): one row per tenant, sensor, shard, minute and stage
ADD_STAGE_COUNT = """
INSERT INTO stage_counts (tenant, sensor, shard_id, received_minute, stage, events)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (tenant, received_minute, sensor, shard_id, stage)
DO UPDATE SET events = stage_counts.events + excluded.events
"""
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class StageTally(dict):
    """Events per audit counter, (tenant, sensor, shard, minute, stage) -> n, added up in memory and then added
    to `stage_counts` in one statement. Every writer of the counters goes through here."""

    def count(self, tenant: str, sensor: str | None, shard_id: str, received_at: datetime, stage: str,
              events: int = 1) -> None:
        key = (tenant, sensor or "", shard_id, minute_of(received_at), stage)
        self[key] = self.get(key, 0) + events

    def add(self, key: tuple, events: int) -> None:
        """A counter whose key is made already (the sweeper's hours)."""
        self[key] = self.get(key, 0) + events

    async def write(self, conn) -> int:
        rows = sorted((*key, n) for key, n in self.items() if n)  # in key order: writers never deadlock
        await conn.executemany(ADD_STAGE_COUNT, rows)
        return len(rows)


class AcknowledgedCounts:
    """Ingest's `acknowledged` counters, kept in the replica and added to Postgres every `flush_interval_s`."""

    def __init__(self, pool: asyncpg.Pool, flush_interval_s: float = 0.5):
        self.pool = pool
        self.flush_interval_s = flush_interval_s
        self._counts = StageTally()
        self._task: asyncio.Task | None = None

    def add(self, tenant: str, sensor: str, shard_id: str, received_at: datetime, events: int) -> None:
        self._counts.count(tenant, sensor, shard_id, received_at, "acknowledged", events)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
            except Exception as exc:  # kept; tried again at the next tick
                log.warning("acknowledged counters not flushed (%d rows kept): %s", len(self._counts), exc)

    async def flush(self) -> int:
        if not self._counts:
            return 0
        counts, self._counts = self._counts, StageTally()
        try:
            async with self.pool.acquire() as conn:
                return await counts.write(conn)
        except BaseException:
            for key, n in counts.items():
                self._counts.add(key, n)
            raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.flush()


# --- receipt objects ------------------------------------------------------------------------


def receipt_key(prefix: str, tenant: str, hour: datetime, shard_id: str, first: int, last: int,
                minutes: tuple[int, int]) -> str:
    """Where a batch's receipts of one tenant and hour go: its sequence range, then the minutes they cover (so
    that reconcile reads only the objects that meet a window)."""
    return (f"{prefix}/tenant={quote(tenant, safe='')}/date={hour:%Y-%m-%d}/hour={hour:%H}/"
            f"shard={shard_id}/{first}-{last}.m{minutes[0]:02d}-{minutes[1]:02d}.json.gz")


def hour_prefix(prefix: str, tenant: str, hour: datetime) -> str:
    return f"{prefix}/tenant={quote(tenant, safe='')}/date={hour:%Y-%m-%d}/hour={hour:%H}/"


def micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


_MICROSECOND = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc) - _EPOCH


def encode_receipts(tenant: str, shard_id: str, first: int, last: int, copies: list[Any],
                    duplicate: list[bool], forwarded: list[bool] | None = None,
                    erased: list[bool] | None = None) -> bytes:
    """One receipt object: `copies` are decoded events (lap.process.batch.Decoded) of one tenant and hour.

    `forwarded`: copies this shard put back into the stream for the shard that owns their learner (that shard
    decides whether they are stored); copies that are such a forward (`relayed`) are no new acceptance.
    `erased`: copies of an erased learner's events, named by their fingerprint, not their id.
    """
    erased = erased or [False] * len(copies)
    seqs: dict[int, int] = {}
    requests: dict[str, int] = {}
    sensors: dict[str, int] = {}
    event_id, record, position, received, request, sensor, describe, relayed = [], [], [], [], [], [], [], []
    for copy, gone in zip(copies, erased):
        meta = copy.meta
        event_id.append(erased_id(tenant, meta["event_id"]) if gone else meta["event_id"])
        record.append(seqs.setdefault(copy.sequence, len(seqs)))
        position.append(copy.position)
        received.append(micros(copy.received_at))
        request.append(requests.setdefault(meta.get("request_id") or "", len(requests)))
        sensor.append(sensors.setdefault(meta.get("sensor") or "", len(sensors)))
        describe.append(1 if meta.get("kind") == "entity" else 0)
        relayed.append(1 if "forwarded_from" in meta else 0)
    doc = {"format": FORMAT, "tenant": tenant, "shard": shard_id, "first_seq": str(first), "last_seq": str(last),
           "seqs": [str(s) for s in seqs], "requests": list(requests), "sensors": list(sensors),
           "event_id": event_id, "record": record, "position": position, "received_us": received,
           "request": request, "sensor": sensor, "describe": describe, "duplicate": [int(d) for d in duplicate],
           "forwarded": [int(f) for f in (forwarded or [False] * len(copies))], "relayed": relayed}
    return gzip.compress(orjson.dumps(doc), compresslevel=3, mtime=0)


@dataclass
class ReceiptObject:
    """What one receipt object says of itself: the batch's shard and range, and its records' sequence numbers."""

    shard: str
    first: int
    last: int
    seqs: list[int]  # Python ints: sequence numbers pass 64 bits


@dataclass
class Receipts:
    """Receipt objects loaded as columns, one row per copy read; rows name their object and record in it."""

    objects: list[ReceiptObject]
    event_id: list[str]
    obj: np.ndarray  # index into `objects`
    record: np.ndarray  # index into that object's `seqs`
    position: np.ndarray
    received_us: np.ndarray
    sensor: np.ndarray  # str objects
    describe: np.ndarray
    duplicate: np.ndarray
    forwarded: np.ndarray  # put back into the stream for the shard that owns the learner: never the stored copy
    relayed: np.ndarray  # such a forward, read on that shard: no new copy

    def __len__(self) -> int:
        return len(self.event_id)

    def shard(self, i: int) -> str:
        return self.objects[self.obj[i]].shard

    def seq(self, i: int) -> int:
        return self.objects[self.obj[i]].seqs[self.record[i]]

    def shards(self) -> np.ndarray:
        """The shard of every row."""
        if not self.objects:
            return np.empty(0, dtype=object)
        return np.asarray([o.shard for o in self.objects], dtype=object)[self.obj]

    def select(self, keep: np.ndarray) -> "Receipts":
        idx = np.flatnonzero(keep)
        ids = self.event_id
        return Receipts(self.objects, [ids[i] for i in idx], self.obj[idx], self.record[idx], self.position[idx],
                        self.received_us[idx], self.sensor[idx], self.describe[idx], self.duplicate[idx],
                        self.forwarded[idx], self.relayed[idx])

    def plus(self, other: "Receipts") -> "Receipts":
        if not len(other):
            return self
        shift = len(self.objects)
        return Receipts(self.objects + other.objects, self.event_id + other.event_id,
                        np.concatenate([self.obj, other.obj + shift]), np.concatenate([self.record, other.record]),
                        np.concatenate([self.position, other.position]),
                        np.concatenate([self.received_us, other.received_us]),
                        np.concatenate([self.sensor, other.sensor]), np.concatenate([self.describe, other.describe]),
                        np.concatenate([self.duplicate, other.duplicate]),
                        np.concatenate([self.forwarded, other.forwarded]),
                        np.concatenate([self.relayed, other.relayed]))


def decode_receipts(blobs: list[bytes]) -> Receipts:
    objects: list[ReceiptObject] = []
    ids: list[str] = []
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("obj", "record", "position", "received_us", "sensor",
                                                         "describe", "duplicate", "forwarded", "relayed")}
    for blob in blobs:
        doc = orjson.loads(gzip.decompress(blob))
        if doc.get("format") != FORMAT:
            raise ValueError(f"receipt object of format {doc.get('format')} is not known to this release")
        n = len(doc["event_id"])
        cols["obj"].append(np.full(n, len(objects), dtype=np.int64))
        objects.append(ReceiptObject(doc["shard"], int(doc["first_seq"]), int(doc["last_seq"]),
                                     [int(x) for x in doc["seqs"]]))
        ids.extend(doc["event_id"])
        cols["record"].append(np.asarray(doc["record"], dtype=np.int64))
        cols["position"].append(np.asarray(doc["position"], dtype=np.int64))
        cols["received_us"].append(np.asarray(doc["received_us"], dtype=np.int64))
        sensors = np.asarray(doc["sensors"], dtype=object)
        cols["sensor"].append(sensors[np.asarray(doc["sensor"], dtype=np.int64)] if n else np.empty(0, dtype=object))
        for flag in ("describe", "duplicate", "forwarded", "relayed"):
            cols[flag].append(np.asarray(doc.get(flag) or [0] * n, dtype=bool))

    def cat(name: str, dtype) -> np.ndarray:
        return np.concatenate(cols[name]) if cols[name] else np.empty(0, dtype=dtype)

    return Receipts(objects, ids, cat("obj", np.int64), cat("record", np.int64), cat("position", np.int64),
                    cat("received_us", np.int64), cat("sensor", object), cat("describe", bool),
                    cat("duplicate", bool), cat("forwarded", bool), cat("relayed", bool))


async def rewrite_receipts(s3: Any, settings: Any, tenant: str, hour: datetime, shard_id: str, first: int, last: int,
                           event_ids: set[str]) -> int:
    """Name these events by their fingerprint instead of their id in the receipt objects of one batch, tenant and
    hour (an erasure); returns how many copies are renamed, counting those an interrupted earlier run renamed. A
    receipt past the dedup window is gone already."""
    bucket = settings.archive.bucket
    erased_names = {erased_id(tenant, event_id) for event_id in event_ids}
    prefix = f"{hour_prefix(settings.archive.receipts_prefix, tenant, hour)}shard={shard_id}/{first}-{last}."
    renamed = 0
    paginator = s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            reply = await s3.get_object(Bucket=bucket, Key=entry["Key"])
            async with reply["Body"] as body:
                doc = orjson.loads(gzip.decompress(await body.read()))
            ids = doc["event_id"]
            here = [i for i, event_id in enumerate(ids) if event_id in event_ids]
            for i in here:
                ids[i] = erased_id(tenant, ids[i])
            if here:
                await s3.put_object(Bucket=bucket, Key=entry["Key"],
                                    Body=gzip.compress(orjson.dumps(doc), compresslevel=3, mtime=0),
                                    ContentType="application/json", ContentEncoding="gzip")
            renamed += sum(1 for event_id in ids if event_id in erased_names)  # after the renaming above
    return renamed
