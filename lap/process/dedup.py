"""A shard's duplicate detection: 8-byte fingerprints of the event ids it stored, in memory, for the dedup window.

A learner's events share a shard, and so do a sensor's resends of them, so
each shard consumer only needs the ids its own shard stored. Each id is kept
as a 64-bit fingerprint (BLAKE2b of tenant and id): 8 bytes per event in
memory, no row per event anywhere. The fingerprints are kept in sorted numpy
arrays, one per time bucket (a 24th of the window), so a batch is checked with
a vectorised binary search per bucket and a whole bucket expires at once.

Two different ids share a fingerprint with probability n / 2^64 per event (n:
the ids in the shard's window, ~1e-11 at 200 million): such an event would be
counted as a duplicate and not stored. Reconcile compares the receipts with
what was stored by full id, so it would report it as missing, and a replay
restores it (docs/decisions.md, "Dedup").

Persistence (see `DedupStore`): each committed batch row carries the
fingerprints it stored; when a time bucket closes, the consumer writes the
bucket's sorted array to the archive bucket and clears those batch columns. A
restarted consumer, or the children of a split or merged shard, load their
own and their ancestors' buckets and batch fingerprints for the window.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np

log = logging.getLogger("lap.process")

BUCKETS_PER_WINDOW = 24
# A bucket's open arrays (one per batch) are merged into one sorted array past this many
MAX_OPEN_ARRAYS = 32


def fingerprint(tenant: str, event_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{tenant}\x00{event_id}".encode(), digest_size=8).digest(), "little")


def fingerprints(keys: list[tuple[str, str]]) -> np.ndarray:
    return np.fromiter((fingerprint(t, e) for t, e in keys), dtype=np.uint64, count=len(keys))


def to_bytes(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype="<u8").tobytes()


def from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


@dataclass
class Bucket:
    start: datetime  # received times [start, start + width)
    arrays: list[np.ndarray] = field(default_factory=list)  # each sorted
    size: int = 0

    def add(self, values: np.ndarray) -> None:
        self.arrays.append(np.sort(values))
        self.size += len(values)
        if len(self.arrays) > MAX_OPEN_ARRAYS:
            self.arrays = [np.sort(np.concatenate(self.arrays))]

    def merged(self) -> np.ndarray:
        if len(self.arrays) != 1:
            self.arrays = [np.sort(np.concatenate(self.arrays))] if self.arrays else [np.empty(0, np.uint64)]
        return self.arrays[0]

    def contains(self, values: np.ndarray) -> np.ndarray:
        found = np.zeros(len(values), dtype=bool)
        for array in self.arrays:
            if len(array):
                at = np.searchsorted(array, values)
                at[at == len(array)] = 0
                found |= array[at] == values
        return found


class DedupState:
    """The fingerprints of the ids a shard stored within the window, by received-time bucket."""

    def __init__(self, window_s: float):
        self.window = timedelta(seconds=window_s)
        self.width = self.window / BUCKETS_PER_WINDOW
        self.buckets: dict[datetime, Bucket] = {}

    def bucket_start(self, moment: datetime) -> datetime:
        epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
        return epoch + (moment - epoch) // self.width * self.width

    def __len__(self) -> int:
        return sum(b.size for b in self.buckets.values())

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for b in self.buckets.values() for a in b.arrays)

    def contains(self, values: np.ndarray) -> np.ndarray:
        found = np.zeros(len(values), dtype=bool)
        for bucket in self.buckets.values():
            found |= bucket.contains(values)
        return found

    def add(self, values: np.ndarray, received: list[datetime]) -> None:
        """Add stored fingerprints; `received[i]` is when LAP received the event of `values[i]`."""
        if not len(values):
            return
        starts = [self.bucket_start(r) for r in received]
        if len(set(starts)) == 1:
            self._bucket(starts[0]).add(values)
            return
        order = np.array([s.timestamp() for s in starts])
        for start in sorted(set(starts)):
            self._bucket(start).add(values[order == start.timestamp()])

    def add_bucket(self, start: datetime, values: np.ndarray) -> None:
        self._bucket(start).add(values)

    def _bucket(self, start: datetime) -> Bucket:
        bucket = self.buckets.get(start)
        if bucket is None:
            bucket = self.buckets[start] = Bucket(start)
        return bucket

    def expire(self, now: datetime) -> int:
        """Drop the buckets wholly older than the window; returns how many fingerprints went."""
        cutoff = now - self.window - self.width
        old = [start for start in self.buckets if start < cutoff]
        dropped = sum(self.buckets.pop(start).size for start in old)
        return dropped

    def closed(self, now: datetime, grace: timedelta) -> list[Bucket]:
        """Buckets that no new event can join any more (their time plus `grace` has passed)."""
        return [b for start, b in sorted(self.buckets.items()) if start + self.width + grace <= now]


class DedupStore:
    """Saves and loads one shard's DedupState: bucket objects in the archive bucket, and batch rows.

    The state a consumer commits with each batch (its row's `fingerprints`)
    is durable at once; `save_closed` later moves whole closed buckets to
    objects and clears those batch columns, so Postgres holds at most about a
    bucket's worth of fingerprints per shard (an hour at the default window).
    """

    def __init__(self, settings, pool, s3, stream: str, shard_id: str, state: DedupState):
        self.settings = settings
        self.pool = pool
        self.s3 = s3
        self.stream = stream
        self.shard_id = shard_id
        self.state = state
        self.saved: set[datetime] = set()  # bucket starts whose object holds everything the state has
        self.dirty: set[datetime] = set()  # buckets added to since they were saved (or never saved)
        # a bucket is closed when the consumer has committed events received this long after its end
        self.grace = timedelta(seconds=settings.limits.put_deadline_s + 60)

    def key(self, start: datetime) -> str:
        return (f"{self.settings.archive.dedup_prefix}/stream={self.stream}/shard={self.shard_id}/"
                f"{start:%Y-%m-%dT%H%M%S}.u64")

    def add(self, values: np.ndarray, received: list[datetime]) -> None:
        self.state.add(values, received)
        self.dirty.update(self.state.bucket_start(r) for r in set(received))

    async def load(self, ancestors: list[str]) -> int:
        """The shard's own state and its ancestors' (a split or merge hands theirs on); returns fingerprints."""
        state = self.state
        cutoff = datetime.now(timezone.utc) - state.window - state.width
        shards = [self.shard_id, *ancestors]
        async with self.pool.acquire() as conn:
            segments = await conn.fetch(
                """SELECT shard_id, bucket_start, key FROM dedup_segments
                    WHERE stream = $1 AND shard_id = ANY($2) AND bucket_start >= $3""", self.stream, shards, cutoff)
            batches = await conn.fetch(
                """SELECT fingerprints, max_received_at FROM batches
                    WHERE (stream = $1 OR stream LIKE 'replay:%') AND shard_id = ANY($2)
                      AND fingerprints IS NOT NULL AND max_received_at >= $3""", self.stream, shards, cutoff)
            legacy = await conn.fetch(  # dedup rows of releases before per-shard state, until they age out
                "SELECT tenant, event_id, received_at FROM seen_events WHERE shard_id = ANY($1) AND received_at >= $2",
                shards, cutoff)
        own = {r["bucket_start"] for r in segments if r["shard_id"] == self.shard_id}
        for row in segments:
            if row["shard_id"] != self.shard_id and row["bucket_start"] in own:
                continue  # the shard's own object of that bucket already holds what it inherited
            reply = await self.s3.get_object(Bucket=self.settings.archive.bucket, Key=row["key"])
            async with reply["Body"] as body:
                state.add_bucket(row["bucket_start"], from_bytes(await body.read()))
            if row["shard_id"] == self.shard_id:
                self.saved.add(row["bucket_start"])
        for row in batches:
            start = state.bucket_start(row["max_received_at"])
            state.add_bucket(start, from_bytes(row["fingerprints"]))
            self.dirty.add(start)
        if legacy:
            self.add(fingerprints([(r["tenant"], r["event_id"]) for r in legacy]), [r["received_at"] for r in legacy])
        self.dirty.update(start for start in state.buckets if start not in self.saved)
        return len(state)

    async def save_closed(self, committed_received: datetime) -> int:
        """Save the buckets closed by now (consumer time: `committed_received`) not yet saved as they are."""
        state = self.state
        due = [b for b in state.closed(committed_received, self.grace)
               if b.start not in self.saved or b.start in self.dirty]
        if not due:
            return 0
        for bucket in due:
            await self.s3.put_object(Bucket=self.settings.archive.bucket, Key=self.key(bucket.start),
                                     Body=to_bytes(bucket.merged()), ContentType="application/octet-stream")
        newest_end = max(b.start for b in due) + state.width
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                """INSERT INTO dedup_segments (stream, shard_id, bucket_start, key, events) VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (stream, shard_id, bucket_start)
                   DO UPDATE SET key = excluded.key, events = excluded.events, written_at = now()""",
                [(self.stream, self.shard_id, b.start, self.key(b.start), b.size) for b in due])
            await conn.execute(
                """UPDATE batches SET fingerprints = NULL
                    WHERE stream = $1 AND shard_id = $2 AND fingerprints IS NOT NULL AND max_received_at < $3""",
                self.stream, self.shard_id, newest_end)
        for bucket in due:
            self.saved.add(bucket.start)
            self.dirty.discard(bucket.start)
        return len(due)

    def expire(self, now: datetime) -> int:
        dropped = self.state.expire(now)
        self.saved &= set(self.state.buckets)
        self.dirty &= set(self.state.buckets)
        return dropped
