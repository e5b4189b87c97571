"""Reconcile: for a window of received time, what each stage holds of what was accepted, and what is missing.

The truth per event:

- accepted: the receipts (one per accepted copy; copies of one id beyond the
  first are `duplicates`);
- aggregated: the id has a dedup row (`seen_events`), which commits in the same
  transaction as the aggregates;
- archived: that row's batch names an archive object for the event's tenant and
  hour, and the object is in S3;
- indexed: a document with the id is in the tenant's index.

Each stage should hold every accepted id once (accepted minus duplicates). An id
missing from the aggregates whose stream record is older than the stream's
oldest record can no longer be replayed from the stream: `retention_lost`.
The SQL works on the window's receipts with an index on (tenant,
received_at); the per-id lists are paged, in byte order (COLLATE "C", the
order Python sorts in, whatever the database's locale).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from lap.process.batch import hour_of, minute_of
from lap.settings import Settings
from lap.sinks.archive import keys_in_s3
from lap.sinks.index import index_name
from lap.stream.kinesis import oldest_sequence

ID_SCAN_PAGE = 5000


@dataclass
class Window:
    tenant: str
    start: datetime
    end: datetime
    sensor: str | None = None


@dataclass
class Reconciliation:
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    describes: int = 0
    archived: int = 0
    aggregated: int = 0
    indexed: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    retention_lost: int = 0
    complete: bool = False
    # counts of whole hours take lost archive objects from the sweep's last check (None: per-event, checked now)
    archive_checked_at: datetime | None = None
    missing_ids: dict[str, list[str]] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "missing_ids"}
        if self.missing_ids is not None:
            out["missing_ids"] = self.missing_ids
        return out


# the window's distinct ids with how they were stored; $1 tenant, $2 start, $3 end, $4 sensor
_IDS = """
WITH r AS (
    SELECT event_id, kind, shard_id, sequence_number FROM receipts
     WHERE tenant = $1 AND received_at >= $2 AND received_at < $3 AND ($4::text IS NULL OR sensor = $4)
), ids AS (
    SELECT event_id, count(*) AS copies, bool_or(kind = 'entity') AS describe,
           min(shard_id) AS shard_id, min(sequence_number) AS sequence_number
      FROM r GROUP BY event_id
)
"""


# archived events of tenant $1 in [$2, $3) whose object the last archive check found gone, in the
# hours $4 that the window only partly covers: counted from the dedup rows of each object's batch
_LOST_IN_PARTIAL_HOURS = """
SELECT count(*) FROM lost_archive_objects l
  JOIN archive_objects o ON o.key = l.key
  JOIN seen_events s ON s.batch_id = o.batch_id AND s.tenant = $1
       AND s.received_at >= greatest($2, l.received_hour) AND s.received_at < least($3, l.received_hour + interval '1 hour')
 WHERE l.tenant = $1 AND l.received_hour = ANY($4::timestamptz[])
"""


class ReconcileRefused(Exception):
    """The window needs single events that are no longer kept (older than the dedup window)."""


class Reconciler:
    def __init__(self, settings: Settings, pool, s3, search):
        self.settings = settings
        self.pool = pool
        self.s3 = s3
        self.search = search

    async def run(self, window: Window, with_ids: bool = False, limit: int = 1000,
                  after: dict[str, str] | None = None) -> Reconciliation:
        """The counts for the window; with `with_ids`, up to `limit` missing ids per stage after `after`.

        Counts alone read the counters of the window's whole minutes and look
        at single events only in the partial minutes at its edges (see
        `counts`); the id lists, or a sensor filter, look at every event.
        """
        self.check_kept(window, with_ids)
        if not with_ids and window.sensor is None:
            return await self.counts(window)
        return await self.exact(window, with_ids, limit, after or {})

    def check_kept(self, window: Window, with_ids: bool) -> None:
        """Refuse what needs receipts and dedup rows older than the dedup window: the sweep deletes them.

        Counts of whole hours come from the counters, which are kept (folded
        into hours past the window).
        """
        oldest = datetime.now(timezone.utc) - timedelta(seconds=self.settings.process.dedup_window_s)
        if window.start >= oldest:
            return
        kept_from = f"{oldest:%Y-%m-%dT%H:%M}Z"
        if with_ids or window.sensor is not None:
            raise ReconcileRefused(f"missing ids and sensor filters need single events, kept only for those "
                                   f"received after {kept_from} (process.dedup_window_s); ask for the counts alone")
        partial = [edge for edge in (window.start, window.end) if edge < oldest and hour_of(edge) != edge]
        if partial:
            raise ReconcileRefused(f"before {kept_from} only whole hours can be counted (single events are no "
                                   f"longer kept): start and end the window on the hour, e.g. "
                                   f"{hour_of(partial[0]):%Y-%m-%dT%H:00}Z")

    async def counts(self, window: Window) -> Reconciliation:
        """Counts from `stage_counts` (committed with each batch) for whole minutes, exact counts at the edges.

        Archive objects S3 lost come from the coordinator's periodic check
        (`lost_archive_objects`, as of `archive_checked_at`), so no bucket
        listing is needed; an object holds an hour, so where the window covers
        only part of that hour, the lost object's events inside the window are
        counted from its batch's dedup rows. Cost: the window's minutes, plus
        the events of its partial edge minutes (none for a window that starts
        and ends on whole minutes).
        """
        first = minute_of(window.start)
        if first < window.start:
            first += timedelta(minutes=1)
        last = max(first, minute_of(window.end))
        result = Reconciliation()
        if first >= last:  # no whole minute inside: the window is all edge
            return await self.exact(window, False, 0, {})
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT stage, sum(events)::bigint AS n FROM stage_counts
                    WHERE tenant = $1 AND received_minute >= $2 AND received_minute < $3 GROUP BY stage""",
                window.tenant, first, last)
            lost = await self.lost_archived(conn, window.tenant, first, last)
            result.archive_checked_at = await conn.fetchval("SELECT checked_at FROM archive_checks")
            result.quarantined = await conn.fetchval(
                "SELECT count(*) FROM quarantined WHERE tenant = $1 AND received_at >= $2 AND received_at < $3",
                window.tenant, window.start, window.end)
        stage = {r["stage"]: int(r["n"]) for r in rows}
        accepted, duplicates = stage.get("accepted", 0), stage.get("duplicates", 0)
        describes, aggregated = stage.get("describes", 0), stage.get("aggregated", 0)
        archived = stage.get("archived", 0) - lost
        for edge in (Window(window.tenant, window.start, first), Window(window.tenant, last, window.end)):
            if edge.start < edge.end:
                part = await self.exact(edge, False, 0, {})
                accepted += part.accepted
                duplicates += part.duplicates
                describes += part.describes
                aggregated += part.aggregated
                archived += part.archived
        expected = accepted - duplicates
        result.accepted, result.duplicates, result.describes = accepted, duplicates, describes
        result.aggregated, result.archived = aggregated, archived
        result.indexed = await self._indexed_count(window)
        # Never below 0: a replica that dies loses its last half second of receipts, and their events are then
        # stored without being counted as accepted (docs/decisions.md). Such extras are not losses; the ids
        # path (detail=ids), which goes by the receipts, tells a real loss apart when the two net out.
        result.missing = {"archive": max(0, expected - archived), "aggregate": max(0, expected - aggregated),
                          "index": max(0, expected - result.indexed)}
        if result.missing["aggregate"]:
            result.retention_lost = await self._retention_lost(window)
        result.complete = not any(result.missing.values())
        return result

    async def lost_archived(self, conn, tenant: str, first: datetime, last: datetime) -> int:
        """Archived events in [first, last) whose objects the last check found gone from S3.

        Whole hours add the lost objects' record counts; an hour the window
        only partly covers counts its lost objects' events one by one, from
        their dedup rows (kept for the dedup window: `check_kept` makes older
        windows start and end on the hour).
        """
        whole_from = hour_of(first) if hour_of(first) == first else hour_of(first) + timedelta(hours=1)
        whole_to = hour_of(last)
        lost = 0
        if whole_from < whole_to:
            lost += await conn.fetchval(
                """SELECT coalesce(sum(records), 0) FROM lost_archive_objects
                    WHERE tenant = $1 AND received_hour >= $2 AND received_hour < $3""", tenant, whole_from, whole_to)
        partial = {h for h in (hour_of(first), whole_to) if not (whole_from <= h < whole_to) and h < last}
        if partial:
            lost += await conn.fetchval(_LOST_IN_PARTIAL_HOURS, tenant, first, last, sorted(partial))
        return int(lost)

    async def exact(self, window: Window, with_ids: bool, limit: int, after: dict[str, str]) -> Reconciliation:
        """Every event of the window, one by one."""
        result = Reconciliation()
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_IDS + """
                SELECT count(*) AS ids, coalesce(sum(copies), 0) AS accepted,
                       count(*) FILTER (WHERE describe) AS describes, count(s.event_id) AS stored
                  FROM ids LEFT JOIN seen_events s ON s.tenant = $1 AND s.event_id = ids.event_id""",
                *self._args(window))
            result.quarantined = await conn.fetchval(
                """SELECT count(*) FROM quarantined WHERE tenant = $1 AND received_at >= $2 AND received_at < $3
                      AND ($4::text IS NULL OR sensor = $4)""", *self._args(window))
            unarchived = await self._unarchived_ids(conn, window)
        expected = int(row["ids"])
        result.accepted = int(row["accepted"])
        result.duplicates = result.accepted - expected
        result.describes = int(row["describes"])
        result.aggregated = int(row["stored"])
        result.archived = result.aggregated - len(unarchived)
        result.indexed = await self._indexed_count(window)
        result.missing = {"archive": expected - result.archived, "aggregate": expected - result.aggregated,
                          "index": max(0, expected - result.indexed)}
        if result.missing["aggregate"]:
            result.retention_lost = await self._retention_lost(window)
        result.complete = not any(result.missing.values())
        if with_ids:
            # an id not aggregated is not archived either: its batch never committed (or was undone)
            unstored = await self._unaggregated_ids(window, limit, after.get("archive", ""))
            result.missing_ids = {
                "archive": sorted({i for i in unarchived if i > after.get("archive", "")} | set(unstored))[:limit],
                "aggregate": await self._unaggregated_ids(window, limit, after.get("aggregate", "")),
                "index": await self._unindexed_ids(window, limit, after.get("index", ""))
                if result.missing["index"] else [],
            }
        return result

    @staticmethod
    def _args(window: Window) -> tuple:
        return window.tenant, window.start, window.end, window.sensor

    async def _unaggregated_ids(self, window: Window, limit: int, after: str) -> list[str]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_IDS + """
                SELECT ids.event_id FROM ids
                 WHERE NOT EXISTS (SELECT 1 FROM seen_events s WHERE s.tenant = $1 AND s.event_id = ids.event_id)
                   AND ids.event_id > $5 COLLATE "C"
                 ORDER BY ids.event_id COLLATE "C" LIMIT $6""", *self._args(window), after, limit)
        return [r["event_id"] for r in rows]

    async def _unarchived_ids(self, conn, window: Window) -> set[str]:
        """Stored ids whose archive object is not named by a manifest, or no longer in S3."""
        rows = await conn.fetch(_IDS + """
            SELECT ids.event_id, o.key FROM ids
              JOIN seen_events s ON s.tenant = $1 AND s.event_id = ids.event_id
              LEFT JOIN archive_objects o ON o.batch_id = s.batch_id AND o.tenant = $1
                    AND o.received_hour = date_trunc('hour', s.received_at, 'UTC')""", *self._args(window))
        keys = {r["key"] for r in rows if r["key"] is not None}
        present = await self._keys_in_s3(keys)
        return {r["event_id"] for r in rows if r["key"] is None or r["key"] not in present}

    async def _keys_in_s3(self, keys: set[str]) -> set[str]:
        return await keys_in_s3(self.settings, self.s3, keys)

    def _index_query(self, window: Window) -> dict[str, Any]:
        filters: list[dict] = [
            {"term": {"tenant": window.tenant}},
            {"range": {"received_at": {"gte": _iso(window.start), "lt": _iso(window.end)}}},
        ]
        if window.sensor:
            filters.append({"term": {"sensor": window.sensor}})
        return {"bool": {"filter": filters}}

    async def _indexed_count(self, window: Window) -> int:
        reply = await self.search.count(index=index_name(self.settings, window.tenant),
                                        body={"query": self._index_query(window)}, ignore_unavailable=True)
        return int(reply.get("count", 0))

    async def _unindexed_ids(self, window: Window, limit: int, after: str) -> list[str]:
        indexed: set[str] = set()
        body: dict[str, Any] = {"size": ID_SCAN_PAGE, "_source": False, "query": self._index_query(window),
                                "sort": [{"event_id": "asc"}], "docvalue_fields": ["event_id"]}
        while True:
            reply = await self.search.search(index=index_name(self.settings, window.tenant), body=body,
                                             ignore_unavailable=True)
            hits = reply.get("hits", {}).get("hits", [])
            indexed.update(h["_id"] for h in hits)
            if len(hits) < ID_SCAN_PAGE:
                break
            body["search_after"] = hits[-1]["sort"]
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_IDS + 'SELECT event_id FROM ids WHERE event_id > $5 COLLATE "C" '
                                           'ORDER BY event_id COLLATE "C"', *self._args(window), after)
        return [r["event_id"] for r in rows if r["event_id"] not in indexed][:limit]

    async def _retention_lost(self, window: Window) -> int:
        """Unaggregated ids whose stream record is older than the oldest record the stream still has."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_IDS + """
                SELECT ids.shard_id, ids.sequence_number FROM ids
                 WHERE NOT EXISTS (SELECT 1 FROM seen_events s WHERE s.tenant = $1 AND s.event_id = ids.event_id)""",
                *self._args(window))
        oldest: dict[str, int | None] = {}
        lost = 0
        for r in rows:
            shard = r["shard_id"]
            if shard not in oldest:
                oldest[shard] = await oldest_sequence(self.settings, shard)
            first = oldest[shard]
            if first is None or int(r["sequence_number"]) < first:
                lost += 1
        return lost


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")

