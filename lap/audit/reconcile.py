"""Reconcile: for a window of received time, what each stage holds of what was accepted, and what is missing.

Where the truth is (docs/decisions.md, "Audit trail"):

- accepted: every copy the stream holds. Counted twice, independently: ingest
  counts what it acknowledged (`acknowledged`), and the consumers count every
  copy they read (`accepted`, committed with each batch). Per tenant, sensor,
  shard and minute the larger is the figure: a replica that died before its
  counters reached Postgres is made up by the stream, and events the
  consumers have not read yet by ingest's count;
- pending: acknowledged, not read yet, and still ahead of the shard's
  consumer (its checkpoint is earlier): in flight, not missing;
- duplicates, describes, archived, aggregated: counters committed with each
  batch; indexed: the documents in the tenant's index (distinct by id);
  index_pending: archived by batches the index writer has not reached yet.

Per event (`detail=ids`, a sensor filter, or a window's partial edge minutes):
the receipt objects the consumers wrote (every copy read, duplicates flagged),
set against the committed batches' sequence ranges (which copy was stored, and
so aggregated), their archive objects (archived, unless S3 lost the object)
and the index. All of it in columns: numpy over the window's receipts.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from lap.audit.receipts import ReceiptObject, Receipts, decode_receipts, hour_prefix, micros
from lap.audit.shards import consumers_reached
from lap.audit.tombstones import ERASED_PREFIX, signed64
from lap.buckets import hour_of, minute_of
from lap.process.dedup import fingerprint
from lap.settings import Settings
from lap.sinks.archive import keys_in_s3, read_object
from lap.sinks.index import document_id, index_name
from lap.stream.kinesis import oldest_arrival

ID_SCAN_PAGE = 5000
READ_CONCURRENCY = 16


@dataclass
class Window:
    tenant: str
    start: datetime
    end: datetime
    sensor: str | None = None


MAX_WINDOW = timedelta(days=31)  # one reconcile (or one insight query) at a time


class WindowError(ValueError):
    """A window LAP refuses; the text says how to ask instead (a 400 on the API, an error on the CLI)."""


def checked_window(tenant: str, start: datetime, end: datetime, sensor: str | None = None,
                   names: tuple[str, str] = ("start", "end")) -> Window:
    """The one rule for windows, on the API and the command line: zoned, in range, end after start, and at
    most MAX_WINDOW long. `names` are the parameters' names as the caller's user typed them."""
    for name, value in zip(names, (start, end)):
        if value.tzinfo is None:
            raise WindowError(f"{name} must carry a timezone, e.g. 2026-11-27T00:00:00Z")
        try:
            value.astimezone(timezone.utc)
        except OverflowError:  # year 1 at +14:00, say: before the first UTC instant Python can hold
            raise WindowError(f"{name} is out of the range of dates LAP can store") from None
    if end <= start:
        raise WindowError(f"{names[1]} must be after {names[0]} (start is included, end excluded)")
    if end - start > MAX_WINDOW:
        raise WindowError(f"the window is over {MAX_WINDOW.days} days; reconcile it in parts")
    return Window(tenant, start, end, sensor)


@dataclass
class Reconciliation:
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    describes: int = 0
    archived: int = 0
    aggregated: int = 0
    indexed: int = 0
    pending: int = 0
    index_pending: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    retention_lost: int = 0
    dead_lettered: int = 0  # in records a consumer could not process and kept aside: not missing, not complete
    erased: int = 0  # events of erased learners: taken out of every stage, on purpose (lap.audit.erasure)
    index_expired: int = 0  # archived before retention.index_days: no longer expected in the index
    # no event is missing from any stage so far; some may still be on their way (pending, index_pending)
    nothing_missing: bool = False
    # every accepted event is in every stage it is expected in: nothing missing, nothing on its way, nothing
    # dead-lettered
    complete: bool = False
    # counts of whole hours take lost archive objects from the sweep's last check (None: per-event, checked now)
    archive_checked_at: datetime | None = None
    missing_ids: dict[str, list[str]] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "missing_ids"}
        if self.missing_ids is not None:
            out["missing_ids"] = self.missing_ids
        return out

    def finish(self) -> "Reconciliation":
        expected = self.accepted - self.duplicates - self.pending - self.dead_lettered - self.erased
        self.missing = {"archive": max(0, expected - self.archived), "aggregate": max(0, expected - self.aggregated),
                        "index": max(0, expected - self.indexed - self.index_pending - self.index_expired)}
        self.nothing_missing = not any(self.missing.values())
        self.complete = (self.nothing_missing and not self.pending and not self.index_pending
                         and not self.dead_lettered)
        return self

    @property
    def in_flight(self) -> bool:
        """Nothing is missing, but events are still on their way to a stage: ask again later."""
        return self.nothing_missing and not self.complete and not self.dead_lettered


class ReconcileRefused(Exception):
    """The window asks for what is no longer kept."""


HOUR_US = 3_600_000_000
# The batches (b) the index writer has still to reach: past their shard's live cursor (i), or inside an index
# rebuild's range (f) and not backfilled yet. Neither is missing from the index.
NOT_INDEXED_YET = """
    ((i.last_seq IS NULL OR b.last_seq > i.last_seq)
     OR (f.until_seq IS NOT NULL AND b.last_seq <= f.until_seq AND (f.after_seq IS NULL OR b.first_seq > f.after_seq)
         AND (f.since IS NULL OR b.max_received_at >= f.since)))"""
INDEX_PROGRESS_JOINS = """
    LEFT JOIN index_cursors i ON i.stream = b.stream AND i.shard_id = b.shard_id
    LEFT JOIN index_backfill f ON f.stream = b.stream AND f.shard_id = b.shard_id"""


@dataclass
class Trail:
    """A window's events one by one: for each distinct id, the copy that counts and where it stands."""

    receipts: Receipts
    chosen: np.ndarray  # row of `receipts` that counts for each distinct id
    copies: int  # copies read (accepted)
    stored: np.ndarray  # aggregated
    archived: np.ndarray
    batch_of: np.ndarray  # the committed live batch that stored it, -1 if none did
    index_pending: np.ndarray  # stored by a batch the index writer has not reached yet
    hour_index: np.ndarray  # its copy's received hour, in hours since the epoch
    chosen_ids: np.ndarray  # the ids (str objects), in the order of `chosen`
    dead: np.ndarray  # not stored, and its copy is in a dead-lettered record not replayed yet
    # not stored yet: its copy's record is past its shard's checkpoint, so the batch that read it has not
    # committed (its receipts are written first) and the shard's consumer stores it, or reads it again
    in_flight: np.ndarray
    in_flight_copies: int  # copies read by such batches (the accepted counters do not hold them yet)
    erased: np.ndarray  # of an erased learner: expected in no stage

    def __len__(self) -> int:
        return len(self.chosen)

    def id(self, k: int) -> str:
        return self.chosen_ids[k]

    def ids(self, which: np.ndarray | None = None) -> np.ndarray:
        return self.chosen_ids if which is None else self.chosen_ids[which]

    def first_copy(self, k: int) -> tuple[str, int, int]:
        """(shard, sequence number, position) of the copy to read back."""
        i = self.chosen[k]
        return self.receipts.shard(i), self.receipts.seq(i), int(self.receipts.position[i])

    def hour(self, k: int) -> datetime:
        return datetime.fromtimestamp(int(self.hour_index[k]) * 3600, timezone.utc)

    def batch(self, k: int) -> int | None:
        b = int(self.batch_of[k])
        return None if b < 0 else b

    def unstored_records(self) -> set[tuple[str, int]]:
        """(shard, sequence number) of the records whose copy counts for an id no batch stored."""
        return {(self.receipts.shard(i), self.receipts.seq(i)) for i in self.chosen[~self.stored]}


class Reconciler:
    def __init__(self, settings: Settings, pool, s3, search, progress=None):
        self.settings = settings
        self.pool = pool
        self.s3 = s3
        self.search = search
        self.progress = progress  # progress(step, done, total), for the CLI's bar while receipts are read

    async def run(self, window: Window, with_ids: bool = False, limit: int = 1000,
                  after: dict[str, str] | None = None) -> Reconciliation:
        """The counts for the window; with `with_ids`, up to `limit` missing ids per stage after `after`.

        Counts alone read the counters of the window's whole minutes, and look at
        single events only in the partial minutes at its edges; the id lists, or a
        sensor filter, look at every event of the window.
        """
        self.check_kept(window, with_ids)
        if not with_ids and window.sensor is None:
            return await self.counts(window)
        return await self.exact(window, with_ids, limit, after or {})

    def check_kept(self, window: Window, with_ids: bool) -> None:
        """Refuse what needs single events the sweep no longer keeps (older than the audit retention).

        Counts of whole hours come from the counters, which are kept (folded
        into hours past the dedup window).
        """
        oldest = datetime.now(timezone.utc) - timedelta(seconds=self.settings.process.dedup_window_s)
        if window.start >= oldest:
            return
        kept_from = f"{oldest:%Y-%m-%dT%H:%M}Z"
        if with_ids or window.sensor is not None:
            raise ReconcileRefused(f"missing ids and sensor filters need single events, looked at only for those "
                                   f"received after {kept_from} (process.dedup_window_s); ask for the counts alone")
        partial = [edge for edge in (window.start, window.end) if edge < oldest and hour_of(edge) != edge]
        if partial:
            raise ReconcileRefused(f"before {kept_from} only whole hours can be counted: start and end the window "
                                   f"on the hour, e.g. {hour_of(partial[0]):%Y-%m-%dT%H:00}Z")

    # --- counts -----------------------------------------------------------------------------

    async def counts(self, window: Window) -> Reconciliation:
        """Counters for the whole minutes, single events at the edges; lost archive objects from the sweep's check."""
        first = minute_of(window.start)
        if first < window.start:
            first += timedelta(minutes=1)
        last = max(first, minute_of(window.end))
        if first >= last:  # no whole minute inside: the window is all edge
            return await self.exact(window, False, 0, {})
        result = Reconciliation()
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT sensor, shard_id, received_minute,
                          coalesce(sum(events) FILTER (WHERE stage = 'acknowledged'), 0)::bigint AS acknowledged,
                          coalesce(sum(events) FILTER (WHERE stage = 'accepted'), 0)::bigint AS accepted,
                          coalesce(sum(events) FILTER (WHERE stage = 'duplicates'), 0)::bigint AS duplicates,
                          coalesce(sum(events) FILTER (WHERE stage = 'describes'), 0)::bigint AS describes,
                          coalesce(sum(events) FILTER (WHERE stage = 'archived'), 0)::bigint AS archived,
                          coalesce(sum(events) FILTER (WHERE stage = 'aggregated'), 0)::bigint AS aggregated,
                          coalesce(sum(events) FILTER (WHERE stage = 'erased'), 0)::bigint AS erased
                     FROM stage_counts
                    WHERE tenant = $1 AND received_minute >= $2 AND received_minute < $3
                    GROUP BY sensor, shard_id, received_minute""", window.tenant, first, last)
            reached = await consumers_reached(conn, self.settings.stream.name)
            result.index_pending = await conn.fetchval(
                f"""SELECT coalesce(sum(o.records), 0) FROM archive_objects o JOIN batches b ON b.id = o.batch_id
                      {INDEX_PROGRESS_JOINS}
                     WHERE o.tenant = $1 AND o.received_hour >= $2 AND o.received_hour < $3 AND b.stream = $4
                       AND {NOT_INDEXED_YET}""",
                window.tenant, hour_of(first), last, self.settings.stream.name)
            lost_objects = await self.lost_archived(conn, window.tenant, first, last)
            result.archive_checked_at = await conn.fetchval("SELECT checked_at FROM archive_checks")
            result.quarantined = await self._quarantined(conn, window)
            result.dead_lettered = await self._dead_lettered(conn, window)
        oldest: dict[str, datetime | None] = {}
        cutoff = self.settings.index_cutoff()
        for r in rows:
            if cutoff is not None and r["received_minute"] + timedelta(minutes=1) <= cutoff:
                result.index_expired += r["archived"]
            result.accepted += max(r["acknowledged"], r["accepted"])
            result.duplicates += r["duplicates"]
            result.describes += r["describes"]
            result.archived += r["archived"]
            result.aggregated += r["aggregated"]
            result.erased += r["erased"]
            gap = r["acknowledged"] - r["accepted"]
            if gap > 0:
                if self.is_pending(r["shard_id"], r["received_minute"], reached):
                    result.pending += gap
                else:  # passed without being read: lost, and past the stream's retention if older than its oldest
                    if r["shard_id"] not in oldest:
                        oldest[r["shard_id"]] = await oldest_arrival(self.settings, r["shard_id"])
                    first_kept = oldest[r["shard_id"]]
                    if first_kept is None or r["received_minute"] + timedelta(minutes=1) <= first_kept:
                        result.retention_lost += gap
        result.archived -= lost_objects
        for edge in (Window(window.tenant, window.start, first), Window(window.tenant, last, window.end)):
            if edge.start < edge.end:
                part = await self.exact(edge, False, 0, {})
                for name in ("accepted", "duplicates", "describes", "archived", "aggregated", "pending",
                             "index_expired", "erased"):  # not
                    # index_pending: counted above for the whole hours the edges fall in
                    setattr(result, name, getattr(result, name) + getattr(part, name))
        result.indexed = await self._indexed_count(window)
        return result.finish()

    def is_pending(self, shard_id: str, minute: datetime, reached: dict[str, datetime | None]) -> bool:
        """Whether a minute's events on a shard may still be ahead of its consumer (records can reach the stream
        up to the put deadline after they were received)."""
        newest = reached.get(shard_id)
        slack = timedelta(minutes=1, seconds=self.settings.limits.put_deadline_s)
        return newest is None or newest < minute + slack

    async def lost_archived(self, conn, tenant: str, first: datetime, last: datetime) -> int:
        """Archived events in [first, last) whose objects the last archive check found gone from S3.

        Whole hours add the lost objects' record counts; an hour the window only
        partly covers counts a lost object's events inside the window from its
        batch's receipt objects (the copies that batch stored).
        """
        whole_from = hour_of(first) if hour_of(first) == first else hour_of(first) + timedelta(hours=1)
        whole_to = hour_of(last)
        lost = 0
        if whole_from < whole_to:
            lost += await conn.fetchval(
                """SELECT coalesce(sum(records), 0) FROM lost_archive_objects
                    WHERE tenant = $1 AND received_hour >= $2 AND received_hour < $3""", tenant, whole_from, whole_to)
        for hour in {h for h in (hour_of(first), whole_to) if not (whole_from <= h < whole_to) and h < last}:
            objects = await conn.fetch(
                """SELECT o.key, b.shard_id, b.first_seq, b.last_seq FROM lost_archive_objects l
                     JOIN archive_objects o ON o.key = l.key JOIN batches b ON b.id = o.batch_id
                    WHERE l.tenant = $1 AND l.received_hour = $2""", tenant, hour)
            if not objects:
                continue
            receipts = await self.load_receipts(Window(tenant, max(first, hour), min(last, hour + timedelta(hours=1))),
                                                batches={(o["shard_id"], int(o["first_seq"]), int(o["last_seq"]))
                                                         for o in objects})
            lost += int((~(receipts.duplicate | receipts.forwarded)).sum())
        return int(lost)

    # --- per event ----------------------------------------------------------------------------

    async def exact(self, window: Window, with_ids: bool, limit: int, after: dict[str, str]) -> Reconciliation:
        """Every event of the window, one by one."""
        result = Reconciliation()
        trail = await self.trail(window)
        async with self.pool.acquire() as conn:
            result.quarantined = await self._quarantined(conn, window)
            result.pending = await self._pending(conn, window)  # acknowledged, not read by the consumers yet
        # The counters' pending (acknowledged less what committed batches read) also holds the copies read by
        # batches not committed yet, which the receipts hold too: those are in flight, the rest not read yet.
        unread = max(0, result.pending - trail.in_flight_copies)
        result.accepted = trail.copies + unread
        result.pending = unread + int(trail.in_flight.sum())
        result.duplicates = trail.copies - len(trail)
        result.describes = int(trail.receipts.describe[trail.chosen].sum())
        result.aggregated = int(trail.stored.sum())
        result.archived = int(trail.archived.sum())
        result.dead_lettered = int(trail.dead.sum())
        result.erased = int(trail.erased.sum())
        cutoff = self.settings.index_cutoff()
        expired = np.zeros(len(trail), dtype=bool) if cutoff is None else \
            trail.archived & (trail.receipts.received_us[trail.chosen] < micros(cutoff))
        result.index_expired = int(expired.sum())
        indexed_ids: set[str] | None = None
        if with_ids:
            indexed_ids = await self._indexed_ids(window)
            ids = trail.ids()
            in_index = np.fromiter((document_id(i) in indexed_ids for i in ids), dtype=bool, count=len(ids))
            result.indexed = int(in_index.sum()) if window.sensor else len(indexed_ids)
            result.index_pending = int((trail.index_pending & ~in_index).sum())
        else:
            result.indexed = await self._indexed_count(window)
            # an upper bound (some may be indexed already), never more than what is not indexed
            result.index_pending = max(0, min(int(trail.index_pending.sum()), result.archived - result.indexed))
        result.finish()
        if with_ids:
            def listed(mask: np.ndarray, stage: str) -> list[str]:
                """The first `limit` ids after the cursor, in byte order, of those the mask marks."""
                start = after.get(stage, "")
                return heapq.nsmallest(limit, (i for i in ids[mask] if i > start))

            # dead-lettered events are listed by /v1/audit/dead-letters, not as missing; those in flight are pending
            alive = ~trail.dead & ~trail.in_flight & ~trail.erased
            result.missing_ids = {
                "archive": listed(~trail.archived & alive, "archive"),  # not stored, or its object is gone
                "aggregate": listed(~trail.stored & alive, "aggregate"),
                "index": listed(~in_index & ~trail.index_pending & ~expired & alive, "index")
                if result.missing["index"] else [],
            }
        return result

    async def trail(self, window: Window) -> Trail:
        """The window's receipts, set against the committed batches, their archive objects and the replays."""
        receipts = await self.load_receipts(window)
        n = len(receipts)
        tenant = window.tenant
        if not n:
            empty = np.zeros(0, dtype=bool)
            return Trail(receipts, np.zeros(0, np.int64), 0, empty, empty, np.zeros(0, np.int64), empty,
                         np.zeros(0, np.int64), np.empty(0, dtype=object), empty, empty, 0, empty)
        # the checkpoints before the batches: a batch committing in between is then seen as in flight or as
        # stored, never as neither (missing, and stored again by a replay)
        read_ahead = await self._read_ahead(receipts)
        chosen, id_array = _first_copies(receipts)
        chosen_ids = id_array[chosen]
        batch_of = await self._covering_batches(receipts, chosen)
        stored = batch_of >= 0
        restored = await self._restored(window)
        if restored:
            stored |= np.fromiter((i in restored for i in chosen_ids), dtype=bool, count=len(chosen))
        hour_index = receipts.received_us[chosen] // HOUR_US
        present = await self._archive_objects(tenant, batch_of)
        archived = stored.copy()
        if present.size or stored.any():
            pairs = batch_of * 1_000_000 + hour_index
            archived &= (batch_of < 0) | np.isin(pairs, present)
        waiting = await self._not_indexed_yet({int(b) for b in np.unique(batch_of) if b >= 0})
        index_pending = np.isin(batch_of, np.fromiter(waiting, dtype=np.int64, count=len(waiting))) if waiting \
            else np.zeros(len(chosen), dtype=bool)
        dead = np.zeros(len(chosen), dtype=bool)
        if not stored.all():
            open_letters = await self.dead_letter_records(window)
            for k in np.flatnonzero(~stored) if open_letters else ():
                i = chosen[k]
                dead[k] = (receipts.shard(i), receipts.seq(i)) in open_letters
        in_flight = read_ahead[chosen] & ~stored & ~dead
        erased = await self._erased(window, chosen_ids)
        if erased.any():
            for mask in (stored, archived, index_pending, dead, in_flight):
                mask &= ~erased
        return Trail(receipts, chosen, n - int(receipts.relayed.sum()), stored, archived, batch_of, index_pending,
                     hour_index, chosen_ids, dead, in_flight, int((read_ahead & ~receipts.relayed).sum()), erased)

    async def _erased(self, window: Window, ids: np.ndarray) -> np.ndarray:
        """Which of these ids are erased events: named by fingerprint in their receipts, or recorded by the
        erasure (a copy the erasure did not rename: a resend, or one a replay met)."""
        erased = np.fromiter((i.startswith(ERASED_PREFIX) for i in ids), dtype=bool, count=len(ids))
        since = window.start - timedelta(seconds=self.settings.process.dedup_window_s)
        async with self.pool.acquire() as conn:
            recorded = {r["fingerprint"] for r in await conn.fetch(
                """SELECT fingerprint FROM erased_events WHERE tenant = $1 AND received_at >= $2
                      AND received_at < $3""", window.tenant, since, window.end)}
        if recorded:
            for k in np.flatnonzero(~erased):
                erased[k] = signed64(fingerprint(window.tenant, ids[k])) in recorded
        return erased

    async def _read_ahead(self, receipts: Receipts) -> np.ndarray:
        """Which copies are past their shard's checkpoint: read by a batch that has not committed yet (a consumer
        writes a batch's receipts before its commit)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT shard_id, sequence_number, finished FROM shard_checkpoints WHERE stream = $1",
                self.settings.stream.name)
        checkpoints = {r["shard_id"]: (None if r["finished"] else -1 if r["sequence_number"] is None
                                       else int(r["sequence_number"])) for r in rows}
        ahead = np.zeros(len(receipts), dtype=bool)
        for o, obj in enumerate(receipts.objects):
            checkpoint = checkpoints.get(obj.shard, -1)
            if checkpoint is None or obj.last <= checkpoint:  # a finished shard, or a committed range
                continue
            rows_of = np.flatnonzero(receipts.obj == o)
            past = np.asarray([seq > checkpoint for seq in obj.seqs], dtype=bool)
            ahead[rows_of] = past[receipts.record[rows_of]]
        return ahead

    async def dead_letter_records(self, window: Window) -> set[tuple[str, int]]:
        """(shard, sequence number) of the window's dead-lettered records that no replay has stored yet."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT shard_id, sequence_number FROM dead_letters
                    WHERE stream = $1 AND tenant = $2 AND received_at >= $3 AND received_at < $4
                      AND replayed_at IS NULL""", self.settings.stream.name, window.tenant, window.start, window.end)
        return {(r["shard_id"], int(r["sequence_number"])) for r in rows}

    async def _dead_lettered(self, conn, window: Window) -> int:
        return await conn.fetchval(
            """SELECT coalesce(sum(events), 0) FROM dead_letters
                WHERE stream = $1 AND tenant = $2 AND received_at >= $3 AND received_at < $4
                  AND replayed_at IS NULL AND ($5::text IS NULL OR sensor = $5)""",
            self.settings.stream.name, window.tenant, window.start, window.end, window.sensor)

    async def load_receipts(self, window: Window, batches: set[tuple[str, int, int]] | None = None) -> Receipts:
        """The receipts of the window (the consumers' objects, and the rows of releases before them); with
        `batches`, only those of the given (shard, first, last) batches."""
        keys: list[str] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        hour = hour_of(window.start)
        while hour < window.end:
            prefix = hour_prefix(self.settings.archive.receipts_prefix, window.tenant, hour)
            async for page in paginator.paginate(Bucket=self.settings.archive.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if batches is not None and _batch_of_key(key) not in batches:
                        continue
                    if _minutes_overlap(key, hour, window):
                        keys.append(key)
            hour += timedelta(hours=1)
        semaphore = asyncio.Semaphore(READ_CONCURRENCY)
        done = 0

        async def read(key: str) -> bytes:
            nonlocal done
            async with semaphore:
                reply = await self.s3.get_object(Bucket=self.settings.archive.bucket, Key=key)
                async with reply["Body"] as body:
                    blob = await body.read()
            done += 1
            if self.progress is not None:
                self.progress("receipts", done, len(keys))
            return blob

        blobs = await asyncio.gather(*(read(k) for k in keys))
        receipts = _overlaps_removed(decode_receipts(blobs))
        if batches is None:
            receipts = receipts.plus(await self._legacy_receipts(window))
        keep = (receipts.received_us >= micros(window.start)) & (receipts.received_us < micros(window.end))
        if window.sensor is not None:
            keep &= receipts.sensor == window.sensor
        return receipts if keep.all() else receipts.select(keep)

    async def _legacy_receipts(self, window: Window) -> Receipts:
        """Receipt rows written before receipts moved to objects (they age out with the dedup window)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT event_id, shard_id, sequence_number, position, received_at, sensor, kind
                     FROM receipts WHERE tenant = $1 AND received_at >= $2 AND received_at < $3""",
                window.tenant, window.start, window.end)
        by_shard: dict[str, ReceiptObject] = {}
        obj, record = [], []
        for r in rows:
            o = by_shard.get(r["shard_id"])
            if o is None:
                o = by_shard[r["shard_id"]] = ReceiptObject(r["shard_id"], 0, -1, [])
            obj.append(list(by_shard).index(r["shard_id"]))
            record.append(len(o.seqs))
            o.seqs.append(int(r["sequence_number"]))
        n = len(rows)
        none = np.zeros(n, dtype=bool)
        return Receipts(
            list(by_shard.values()), [r["event_id"] for r in rows], np.asarray(obj, dtype=np.int64),
            np.asarray(record, dtype=np.int64), np.asarray([r["position"] for r in rows], dtype=np.int64),
            np.asarray([micros(r["received_at"]) for r in rows], dtype=np.int64),
            np.asarray([r["sensor"] for r in rows], dtype=object),
            np.asarray([r["kind"] == "entity" for r in rows], dtype=bool),
            none, none, none)  # no flags: the first copy by receipt time counts

    async def _covering_batches(self, receipts: Receipts, chosen: np.ndarray) -> np.ndarray:
        """For each chosen copy, the committed batch of the live stream whose sequence range holds its record (-1
        if none). Receipt objects are written per batch: most match a committed batch exactly."""
        objects = receipts.objects
        by_object = np.full(len(objects), -1, dtype=np.int64)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT b.id, o.i FROM unnest($2::text[], $3::numeric[], $4::numeric[], $5::int[])
                          AS o(shard_id, first_seq, last_seq, i)
                     JOIN batches b ON b.stream = $1 AND b.shard_id = o.shard_id AND b.first_seq = o.first_seq
                          AND b.last_seq = o.last_seq""",
                self.settings.stream.name, [o.shard for o in objects], [o.first for o in objects],
                [o.last for o in objects], list(range(len(objects))))
            for r in rows:
                by_object[r["i"]] = r["id"]
            out = by_object[receipts.obj[chosen]]
            loose = np.flatnonzero(out < 0)  # re-read with other bounds after a crash, or a legacy receipt
            by_shard: dict[str, list[int]] = {}
            for k in loose:
                by_shard.setdefault(receipts.shard(chosen[k]), []).append(int(k))
            for shard, positions in by_shard.items():
                seqs = [receipts.seq(chosen[k]) for k in positions]
                batch_rows = await conn.fetch(
                    """SELECT id, first_seq, last_seq FROM batches
                        WHERE stream = $1 AND shard_id = $2 AND last_seq >= $3 AND first_seq <= $4
                        ORDER BY first_seq""", self.settings.stream.name, shard, min(seqs), max(seqs))
                firsts = [int(r["first_seq"]) for r in batch_rows]
                lasts = [int(r["last_seq"]) for r in batch_rows]
                for k, seq in zip(positions, seqs):
                    at = bisect.bisect_right(firsts, seq) - 1
                    if at >= 0 and seq <= lasts[at]:
                        out[k] = batch_rows[at]["id"]
        return out

    async def _not_indexed_yet(self, batch_ids: set[int]) -> set[int]:
        """Which of these live batches are past their shard's index cursor (the index writer follows on)."""
        if not batch_ids:
            return set()
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"""SELECT b.id FROM batches b {INDEX_PROGRESS_JOINS}
                     WHERE b.id = ANY($1) AND b.stream = $2 AND {NOT_INDEXED_YET}""",
                sorted(batch_ids), self.settings.stream.name)
        return {r["id"] for r in rows}

    async def _restored(self, window: Window) -> set[str]:
        """The ids of the events replays stored in the window's hours (read from their archive objects)."""
        async with self.pool.acquire() as conn:
            keys = [r["key"] for r in await conn.fetch(
                """SELECT o.key FROM archive_objects o JOIN batches b ON b.id = o.batch_id
                    WHERE o.tenant = $1 AND o.received_hour >= $2 AND o.received_hour < $3 AND b.stream LIKE 'replay:%'""",
                window.tenant, hour_of(window.start), window.end)]
        found: set[str] = set()
        for key in keys:
            for line in await read_object(self.s3, self.settings, key):
                found.add(line["meta"]["event_id"])
        return found


    async def _archive_objects(self, tenant: str, batch_of: np.ndarray) -> np.ndarray:
        """batch * 1e6 + hour index of each archive object the manifest names for these batches and S3 still has."""
        wanted = [int(b) for b in np.unique(batch_of) if b >= 0]
        if not wanted:
            return np.zeros(0, dtype=np.int64)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT key, batch_id, received_hour FROM archive_objects WHERE tenant = $1 AND batch_id = ANY($2)",
                tenant, wanted)
        present = await keys_in_s3(self.settings, self.s3, {r["key"] for r in rows})
        return np.asarray([r["batch_id"] * 1_000_000 + int(r["received_hour"].timestamp()) // 3600
                           for r in rows if r["key"] in present], dtype=np.int64)

    async def _pending(self, conn, window: Window) -> int:
        rows = await conn.fetch(
            """SELECT shard_id, received_minute,
                      coalesce(sum(events) FILTER (WHERE stage = 'acknowledged'), 0)::bigint AS acknowledged,
                      coalesce(sum(events) FILTER (WHERE stage = 'accepted'), 0)::bigint AS accepted
                 FROM stage_counts WHERE tenant = $1 AND received_minute >= $2 AND received_minute < $3
                  AND ($4::text IS NULL OR sensor = $4)
                GROUP BY sensor, shard_id, received_minute""", window.tenant, minute_of(window.start), window.end,
            window.sensor)
        reached = await consumers_reached(conn, self.settings.stream.name)
        return sum(r["acknowledged"] - r["accepted"] for r in rows
                   if r["acknowledged"] > r["accepted"] and self.is_pending(r["shard_id"], r["received_minute"], reached))

    async def _quarantined(self, conn, window: Window) -> int:
        return await conn.fetchval(
            """SELECT count(*) FROM quarantined WHERE tenant = $1 AND received_at >= $2 AND received_at < $3
                  AND ($4::text IS NULL OR sensor = $4)""", window.tenant, window.start, window.end, window.sensor)

    def _index_query(self, window: Window) -> dict[str, Any]:
        filters: list[dict] = [{"range": {"received_at": {"gte": _iso(window.start), "lt": _iso(window.end)}}}]
        if window.sensor:
            filters.append({"term": {"sensor": window.sensor}})
        return {"bool": {"filter": filters}}

    async def _indexed_count(self, window: Window) -> int:
        """The window's documents, after a refresh (see `refresh`)."""
        await self.refresh(window.tenant)
        reply = await self.search.count(index=index_name(self.settings, window.tenant),
                                        body={"query": self._index_query(window)}, ignore_unavailable=True)
        return int(reply.get("count", 0))

    async def refresh(self, tenant: str) -> None:
        """A search sees the index as of its last refresh (every `refresh_interval`): documents the index writer
        has just committed, or documents just lost, would not show. The tenant's index is refreshed first, so
        that reconcile reads it as of now (a refresh with nothing new costs next to nothing)."""
        await self.search.indices.refresh(index=index_name(self.settings, tenant), ignore_unavailable=True)

    async def _indexed_ids(self, window: Window) -> set[str]:
        """The document ids (lap.sinks.index.document_id) of the window's documents, after a refresh (see
        _indexed_count). A scroll in index order: the cheapest way through every hit."""
        await self.refresh(window.tenant)
        indexed: set[str] = set()
        body: dict[str, Any] = {"size": ID_SCAN_PAGE, "_source": False, "query": self._index_query(window),
                                "sort": ["_doc"]}
        reply = await self.search.search(index=index_name(self.settings, window.tenant), body=body,
                                         params={"scroll": "2m", "ignore_unavailable": "true"})
        try:
            while hits := reply.get("hits", {}).get("hits", []):
                indexed.update(h["_id"] for h in hits)
                reply = await self.search.scroll(body={"scroll_id": reply["_scroll_id"], "scroll": "2m"})
        finally:
            if reply.get("_scroll_id"):
                await self.search.clear_scroll(body={"scroll_id": reply["_scroll_id"]}, ignore=[404])
        return indexed


def _batch_of_key(key: str) -> tuple[str, int, int]:
    """(shard, first, last) from a receipt object's key: .../shard=S/FIRST-LAST.mAA-BB.json.gz"""
    shard = key.rsplit("/shard=", 1)[1].split("/", 1)[0]
    first, last = key.rsplit("/", 1)[1].split(".", 1)[0].split("-")
    return shard, int(first), int(last)


def _minutes_overlap(key: str, hour: datetime, window: Window) -> bool:
    """Whether a receipt object's minutes (in its key) meet the window."""
    try:
        span = key.rsplit(".m", 1)[1].split(".", 1)[0]
        low, high = (int(m) for m in span.split("-"))
    except (IndexError, ValueError):
        return True
    return hour + timedelta(minutes=low) < window.end and hour + timedelta(minutes=high + 1) > window.start


def _first_copies(receipts: Receipts) -> tuple[np.ndarray, np.ndarray]:
    """For each distinct id, the row of the copy that counts, and the ids of all rows (str objects).

    The copy that counts is one its consumer neither flagged as a duplicate nor
    forwarded, else the first received. Rows are grouped by Python's string
    hash (fast, and stable within this process); only ids with several rows
    (a few percent: duplicates) are sorted further, and should two different
    ids share a hash, they are told apart by the ids themselves.
    """
    n = len(receipts)
    ids = np.asarray(receipts.event_id, dtype=object)
    keys = np.fromiter(map(hash, receipts.event_id), dtype=np.int64, count=n)
    order = np.argsort(keys, kind="stable")
    keys_sorted = keys[order]
    same = np.flatnonzero(keys_sorted[1:] == keys_sorted[:-1])  # row k+1 has the hash of row k
    if same.size and (ids[order[same]] != ids[order[same + 1]]).any():  # two ids share a hash
        rank = {value: r for r, value in enumerate(sorted(set(receipts.event_id)))}
        keys = np.fromiter((rank[i] for i in receipts.event_id), dtype=np.int64, count=n)
        order = np.argsort(keys, kind="stable")
        keys_sorted = keys[order]
        same = np.flatnonzero(keys_sorted[1:] == keys_sorted[:-1])
    starts = np.ones(n, dtype=bool)
    starts[same + 1] = False
    chosen = order[starts]
    if same.size:  # ids with several copies: the best copy of each
        group = np.cumsum(starts) - 1  # group of each sorted row
        several = np.zeros(n, dtype=bool)
        several[same] = True
        several[same + 1] = True
        rows = order[several]
        groups = group[several]
        best = np.lexsort((receipts.position[rows], receipts.received_us[rows],
                           receipts.duplicate[rows] | receipts.forwarded[rows], groups))
        firsts = np.ones(len(best), dtype=bool)
        firsts[1:] = groups[best][1:] != groups[best][:-1]
        chosen[groups[best][firsts]] = rows[best][firsts]
    return chosen, ids


def _overlaps_removed(receipts: Receipts) -> Receipts:
    """One row per copy: a batch read again after a crash with other bounds wrote overlapping objects."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for o in receipts.objects:
        spans.setdefault(o.shard, []).append((o.first, o.last))
    overlapping = set()
    for shard, ranges in spans.items():
        ranges.sort()
        if any(ranges[i][0] <= ranges[i - 1][1] for i in range(1, len(ranges))):
            overlapping.add(shard)
    if not overlapping:
        return receipts
    seen: set[tuple[str, int, int]] = set()
    keep = np.ones(len(receipts), dtype=bool)
    for i in range(len(receipts)):
        shard = receipts.shard(i)
        if shard in overlapping:
            copy = (shard, receipts.seq(i), int(receipts.position[i]))
            keep[i] = copy not in seen
            seen.add(copy)
    return receipts.select(keep)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
