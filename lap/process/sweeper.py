"""The Sweeper: the coordinator's housekeeping, every `process.sweep_interval_s`; no consumer owns it.

It removes orphaned archive objects, prunes dedup rows and receipts past the
dedup window, folds the per-minute audit counters past it into hours, records
archive objects that S3 lost, deletes what is past its retention (the
`retention` settings: docs/retention.md), and reconciles each tenant's last
settled hour into the `lap_reconcile_*` metrics.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

from lap import metrics
from lap.audit.reconcile import Reconciler, Window
from lap.audit.receipts import StageTally
from lap.buckets import hour_of
from lap.settings import Settings
from lap.sinks.archive import check_archive
from lap.sinks.index import expire_documents

log = logging.getLogger("lap.process")

RECONCILE_SETTLE_S = 300  # the reconcile metrics look at an hour only this long after it ended
RECONCILE_REPORT_TIMEOUT_S = 120


async def sweep_orphans(settings: Settings, pool, s3, grace_s: float) -> int:
    """Delete archive objects older than `grace_s` that no committed manifest names; returns how many."""
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=grace_s)
    removed = 0
    paginator = s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=settings.archive.bucket, Prefix=settings.archive.prefix + "/"):
        old = [o["Key"] for o in page.get("Contents", []) if o["LastModified"] < cutoff]
        if not old:
            continue
        async with pool.acquire() as conn:
            known = {r["key"] for r in await conn.fetch("SELECT key FROM archive_objects WHERE key = ANY($1)", old)}
        orphans = [k for k in old if k not in known]
        for key in orphans:
            await s3.delete_object(Bucket=settings.archive.bucket, Key=key)
            log.info("removed orphaned archive object %s", key)
        removed += len(orphans)
    return removed


async def prune_older_than(pool, table: str, window_s: float, chunk: int = 50_000) -> int:
    """Delete the rows of `table` (seen_events or receipts) received before the dedup window, a chunk at a time.

    An id that old is no longer a duplicate anyway, and reconcile counts such
    windows from the counters (it refuses to look at their single events).
    """
    assert table in ("seen_events", "receipts")
    removed = 0
    while True:
        async with pool.acquire() as conn:
            done = await conn.execute(
                f"""DELETE FROM {table} WHERE ctid IN (
                        SELECT ctid FROM {table} WHERE received_at < now() - $1::interval LIMIT $2)""",
                timedelta(seconds=window_s), chunk)
        count = int(done.split()[-1])
        removed += count
        if count < chunk:
            return removed


async def sweep_audit_trail(settings: Settings, pool, s3) -> int:
    """Delete what the dedup window no longer needs: saved dedup buckets, batches' unsaved fingerprints (replays'),
    and receipt objects (reconcile looks at single events only within the window). Returns objects deleted."""
    window = timedelta(seconds=settings.process.dedup_window_s)
    cutoff = datetime.now(timezone.utc) - window - window / 24 - timedelta(hours=1)
    async with pool.acquire() as conn:
        segments = await conn.fetch("DELETE FROM dedup_segments WHERE bucket_start < $1 RETURNING key", cutoff)
        await conn.execute("UPDATE batches SET fingerprints = NULL WHERE fingerprints IS NOT NULL AND "
                           "max_received_at < $1", cutoff)
        tenants = [r["name"] for r in await conn.fetch("SELECT name FROM tenants")]
    keys = [r["key"] for r in segments]
    paginator = s3.get_paginator("list_objects_v2")
    for tenant in tenants:  # keys sort by date and hour within a tenant: stop at the first one inside the window
        prefix = f"{settings.archive.receipts_prefix}/tenant={quote(tenant, safe='')}/"
        done = False
        async for page in paginator.paginate(Bucket=settings.archive.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                try:
                    stamp = datetime.strptime(obj["Key"][len(prefix):len(prefix) + 23], "date=%Y-%m-%d/hour=%H")
                except ValueError:
                    continue
                if stamp.replace(tzinfo=timezone.utc) >= cutoff:
                    done = True
                    break
                keys.append(obj["Key"])
            if done:
                break
    for key in keys:
        await s3.delete_object(Bucket=settings.archive.bucket, Key=key)
    return len(keys)


async def roll_up_counters(pool, window_s: float) -> int:
    """Fold the audit counters of whole hours past the dedup window into one row per hour (its first minute).

    Reconcile reads minutes only where it can also read single events, inside
    the window; beyond it, it counts whole hours, so 60 rows an hour become one.
    Returns how many minute rows were folded.
    """
    before = (datetime.now(timezone.utc) - timedelta(seconds=window_s)).replace(minute=0, second=0, microsecond=0)
    async with pool.acquire() as conn, conn.transaction():
        folded = await conn.fetch(
            """DELETE FROM stage_counts
                WHERE received_minute < $1 AND received_minute <> date_trunc('hour', received_minute, 'UTC')
            RETURNING tenant, sensor, shard_id, date_trunc('hour', received_minute, 'UTC') AS hour, stage, events""",
            before)
        hours = StageTally()
        for r in folded:
            hours.add((r["tenant"], r["sensor"], r["shard_id"], r["hour"], r["stage"]), r["events"])
        await hours.write(conn)
    return len(folded)


async def delete_keys(settings: Settings, s3, keys: list[str]) -> None:
    for start in range(0, len(keys), 1000):
        objects = [{"Key": key} for key in keys[start:start + 1000]]
        await s3.delete_objects(Bucket=settings.archive.bucket, Delete={"Objects": objects, "Quiet": True})


async def enforce_retention(settings: Settings, pool, s3, search, now: datetime | None = None) -> dict[str, int]:
    """Delete what is past its retention, store by store; returns how much of each went. Rows go before their
    objects: an object left by a stop in between is an orphan, which the next sweep removes."""
    r = settings.retention
    now = now or datetime.now(timezone.utc)
    gone: dict[str, int] = {}
    if r.archive_days:
        cutoff = hour_of(now - timedelta(days=r.archive_days))
        while True:
            async with pool.acquire() as conn:
                keys = [row["key"] for row in await conn.fetch(
                    """DELETE FROM archive_objects WHERE key IN (
                           SELECT key FROM archive_objects WHERE received_hour < $1 LIMIT 1000) RETURNING key""",
                    cutoff)]
            if not keys:
                break
            await delete_keys(settings, s3, keys)
            gone["archive_objects"] = gone.get("archive_objects", 0) + len(keys)
    cutoff = now - timedelta(days=r.quarantine_days)
    async with pool.acquire() as conn:
        keys = [row["object_key"] for row in await conn.fetch(
            "DELETE FROM quarantined WHERE received_at < $1 RETURNING object_key", cutoff)]
        await conn.execute("DELETE FROM quarantine_counts WHERE day < $1", cutoff.date())
    await delete_keys(settings, s3, keys)
    gone["quarantined"] = len(keys)
    cutoff = now - timedelta(days=r.dead_letter_days)
    async with pool.acquire() as conn:  # only those a replay stored: an open one's events are nowhere else
        keys = [row["key"] for row in await conn.fetch(
            "DELETE FROM dead_letters WHERE replayed_at < $1 RETURNING key", cutoff)]
    await delete_keys(settings, s3, keys)
    gone["dead_letters"] = len(keys)
    if r.aggregates_days:
        cutoff = now - timedelta(days=r.aggregates_days)
        async with pool.acquire() as conn, conn.transaction():
            for table in ("learner_days", "learner_day_actions", "course_days"):
                gone[table] = int((await conn.execute(f"DELETE FROM {table} WHERE day < $1",
                                                      cutoff.date())).split()[-1])
            gone["course_hours"] = int((await conn.execute("DELETE FROM course_hours WHERE hour < $1",
                                                           hour_of(cutoff))).split()[-1])
    gone["index_documents"] = await expire_documents(search, settings)
    if any(gone.values()):
        log.info("past their retention: %s", ", ".join(f"{k} {v:,}" for k, v in gone.items() if v))
    return gone


class Sweeper:
    def __init__(self, settings: Settings, pool, s3, search):
        self.settings, self.pool, self.s3, self.search = settings, pool, s3, search
        self.reconciled_tenants: set[str] = set()  # so that a tenant that went quiet gets its alarm cleared

    async def sweep(self, grace_s: float | None = None) -> int:
        """Remove orphaned archive objects, and dedup rows and receipts past the window; fold the counters
        past it into hours; record lost archive objects.

        Returns how many orphans were removed.
        """
        grace = self.settings.process.orphan_grace_s if grace_s is None else grace_s
        removed = await sweep_orphans(self.settings, self.pool, self.s3, grace)
        for table in ("seen_events", "receipts"):  # rows of releases before the per-batch audit trail
            await prune_older_than(self.pool, table, self.settings.process.dedup_window_s)
        await sweep_audit_trail(self.settings, self.pool, self.s3)
        await roll_up_counters(self.pool, self.settings.process.dedup_window_s)
        since = datetime.now(timezone.utc) - timedelta(seconds=self.settings.process.dedup_window_s)
        lost = await check_archive(self.settings, self.pool, self.s3, since.replace(minute=0, second=0, microsecond=0))
        if lost:
            log.error("%d archive objects named by the manifest are gone from S3; reconcile and replay them", lost)
        try:  # OpenSearch away must not hold up the rest of the sweep
            await enforce_retention(self.settings, self.pool, self.s3, self.search)
        except Exception as exc:
            log.warning("retention not enforced in this sweep: %s", exc)
        try:  # the figures of a dashboard must not hold up the sweep, nor the consumers' restarts
            await asyncio.wait_for(self.report_reconcile(), RECONCILE_REPORT_TIMEOUT_S)
        except Exception as exc:
            log.warning("reconcile metrics not updated: %s", exc)
        return removed

    async def report_reconcile(self, end: datetime | None = None) -> dict[str, dict[str, int]]:
        """Reconcile each tenant's hour before `end` into the `lap_reconcile_*` metrics; tenant -> missing.

        By default the last settled hour: the whole hour that ended at least
        RECONCILE_SETTLE_S ago, so events still on their way are not reported
        as missing.
        """
        if end is None:
            end = hour_of(datetime.now(timezone.utc) - timedelta(seconds=RECONCILE_SETTLE_S))
        start = end - timedelta(hours=1)
        async with self.pool.acquire() as conn:  # by the counters' primary key, tenant first
            tenants = [r["name"] for r in await conn.fetch(
                """SELECT name FROM tenants t WHERE EXISTS (
                       SELECT 1 FROM stage_counts s WHERE s.tenant = t.name
                          AND s.received_minute >= $1 AND s.received_minute < $2
                          AND s.stage IN ('acknowledged', 'accepted'))""",
                start, end)]
        reconciler = Reconciler(self.settings, self.pool, self.s3, self.search)
        missing = {}
        for tenant in tenants:
            result = await reconciler.counts(Window(tenant, start, end))
            missing[tenant] = result.missing
        # a tenant reported before and quiet in this hour has nothing missing in it: no stale alarm stays up
        for tenant in self.reconciled_tenants - set(missing):
            missing[tenant] = {stage: 0 for stage in ("archive", "aggregate", "index")}
        for tenant, stages in missing.items():
            for stage, count in stages.items():
                metrics.reconcile_missing().set(count, tags={"tenant": tenant, "stage": stage})
            metrics.reconcile_complete().set(int(not any(stages.values())), tags={"tenant": tenant})
        self.reconciled_tenants |= set(missing)
        return missing
