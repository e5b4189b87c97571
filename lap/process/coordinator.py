"""Coordinator: runs one ShardConsumer per shard that is ready, and, every `process.sweep_interval_s`,
does the housekeeping no consumer owns: it removes orphaned archive objects, prunes dedup rows and receipts
past the dedup window, folds the per-minute audit counters past it into hours, records archive objects
that S3 lost, and reconciles each tenant's last hour into the `lap_reconcile_*` metrics.

A shard is ready when it is not finished and every parent it has (after a split
or a merge) is finished: a parent is drained before its children start, so one
learner's events are processed in order across a reshard. Shards and their
checkpoints live in Postgres, so a restarted coordinator (or cluster) resumes
where it stopped. Consumers are owned by the coordinator: if it dies they go
with it, and its restart starts them again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lap import metrics
from lap.audit.actor import NAMESPACE
from lap.audit.reconcile import Reconciler, Window
from lap.aws import open_client
from lap.process.batch import ADD_STAGE_COUNT, hour_of
from lap.process.consumer import ShardConsumer
from lap.settings import Settings, load_settings
from lap.sinks.archive import check_archive
from lap.sinks.index import open_opensearch
from lap.sinks.store import create_pool
from lap.stream.kinesis import list_shards

log = logging.getLogger("lap.process")

COORDINATOR = "lap-coordinator"
# Ray places an actor that asks for no resources wherever it likes, ignoring its node affinity (measured on a
# three-node cluster: 1 of 4 on the node asked for; with 0.01 CPU, 4 of 4). So a consumer asks for at least this.
CONSUMER_MIN_CPUS = 0.01
RECONCILE_SETTLE_S = 300  # the reconcile metrics look at an hour only this long after it ended
RECONCILE_REPORT_TIMEOUT_S = 120


def consumer_name(shard_id: str) -> str:
    return f"lap-shard-{shard_id}"


def ready_shards(checkpoints: dict[str, dict[str, Any]]) -> list[str]:
    """Shards to consume now: not finished, and every known parent finished."""
    ready = []
    for shard_id, row in sorted(checkpoints.items()):
        if row["finished"]:
            continue
        parents = [p for p in row["parent_ids"] if p in checkpoints]  # a parent gone from the stream has nothing left
        if all(checkpoints[p]["finished"] for p in parents):
            ready.append(shard_id)
    return ready


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
        sums: dict[tuple, int] = {}
        for r in folded:
            key = (r["tenant"], r["sensor"], r["shard_id"], r["hour"], r["stage"])
            sums[key] = sums.get(key, 0) + r["events"]
        await conn.executemany(ADD_STAGE_COUNT, sorted((*key, n) for key, n in sums.items()))
    return len(folded)


@ray.remote(max_restarts=-1, max_task_retries=-1)
class Coordinator:
    def __init__(self) -> None:
        self.settings = load_settings()
        self.consumers: dict[str, Any] = {}
        self.placed: dict[str, str] = {}  # shard id -> the node its consumer was asked to start on
        self.runs: dict[str, asyncio.Task] = {}
        self._task: asyncio.Task | None = None
        self._clients: AsyncExitStack | None = None
        self.reconciled_tenants: set[str] = set()

    def ping(self) -> bool:
        return True

    async def run(self) -> None:
        """Watch shards and consumers until the actor stops (a second call waits on the first)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.shield(self._task)

    async def _open(self) -> None:
        if self._clients is None:
            stack = AsyncExitStack()
            self.pool = await create_pool(self.settings)
            stack.push_async_callback(self.pool.close)
            self.kinesis = await open_client(stack, self.settings, "kinesis")
            self.s3 = await open_client(stack, self.settings, "s3")
            self.search = open_opensearch(self.settings)
            stack.push_async_callback(self.search.close)
            self._clients = stack

    async def _run(self) -> None:
        p = self.settings.process
        last_sweep = time.monotonic()
        while True:
            try:
                await self._open()
                await self.step()
                if time.monotonic() - last_sweep >= p.sweep_interval_s:
                    last_sweep = time.monotonic()
                    await self.sweep()
            except Exception as exc:  # Kinesis or Postgres away: consumers keep running; look again later
                log.warning("coordinator step failed: %s", exc)
            await asyncio.sleep(p.coordinator_interval_s)

    async def sweep(self, grace_s: float | None = None) -> int:
        """Remove orphaned archive objects, and dedup rows and receipts past the window; fold the counters
        past it into hours; record lost archive objects.

        Returns how many orphans were removed.
        """
        await self._open()
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
        await self._open()
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

    async def step(self) -> None:
        stream = self.settings.stream.name
        shards = await list_shards(self.kinesis, self.settings)
        async with self.pool.acquire() as conn:
            await conn.executemany(
                """INSERT INTO shard_checkpoints (stream, shard_id, parent_ids) VALUES ($1, $2, $3)
                   ON CONFLICT (stream, shard_id) DO NOTHING""",
                [(stream, s["ShardId"], [p for p in (s.get("ParentShardId"), s.get("AdjacentParentShardId")) if p])
                 for s in shards])
            rows = await conn.fetch(
                "SELECT shard_id, parent_ids, finished FROM shard_checkpoints WHERE stream = $1", stream)
        checkpoints = {r["shard_id"]: dict(r) for r in rows}
        self.reap()
        for shard_id in ready_shards(checkpoints):
            if shard_id not in self.runs:
                self.start(shard_id)
        for shard_id, row in checkpoints.items():
            if row["finished"] and shard_id in self.consumers and shard_id not in self.runs:
                ray.kill(self.consumers.pop(shard_id), no_restart=True)  # its process is no longer needed

    def start(self, shard_id: str) -> None:
        handle = self.consumers.get(shard_id)
        if handle is None:
            handle = ShardConsumer.options(
                name=consumer_name(shard_id), namespace=NAMESPACE, get_if_exists=True,
                num_cpus=max(self.settings.process.actor_num_cpus, CONSUMER_MIN_CPUS),
                scheduling_strategy=self.placement(shard_id),
            ).remote(shard_id)
            self.consumers[shard_id] = handle
        self.runs[shard_id] = asyncio.get_running_loop().create_task(self._consume(shard_id, handle))

    def placement(self, shard_id: str) -> NodeAffinitySchedulingStrategy | str:
        """The live worker node with the fewest consumers this coordinator placed, asked softly.

        Ray's SPREAD is best effort: it put all four consumers on one of three
        nodes now and then. Soft affinity still lets Ray start (or restart) the
        consumer elsewhere when that node is full or gone. Nodes without CPUs
        (the cluster's head) are left out.
        """
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
        if not nodes:
            return "SPREAD"
        self.placed = {s: n for s, n in self.placed.items() if n in nodes and s in self.consumers}
        load = {n: 0 for n in nodes}
        for node in self.placed.values():
            load[node] += 1
        node = min(nodes, key=lambda n: (load[n], n))
        self.placed[shard_id] = node
        return NodeAffinitySchedulingStrategy(node_id=node, soft=True)

    async def _consume(self, shard_id: str, handle) -> str:
        # Ray re-runs `run` itself when the actor restarts; this returns when the shard is done
        # or lost, or raises if the actor is gone for good (killed with no_restart).
        return await handle.run.remote()

    def reap(self) -> None:
        """Collect consumers whose run ended; those that must go on start again in this step."""
        for shard_id, task in list(self.runs.items()):
            if not task.done():
                continue
            del self.runs[shard_id]
            try:
                outcome = task.result()
            except Exception as exc:
                log.warning("consumer of shard %s ended with %s; starting it again", shard_id, exc)
                self.consumers.pop(shard_id, None)
                continue
            log.info("consumer of shard %s stopped (%s)", shard_id, outcome)
