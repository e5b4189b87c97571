"""IndexWriter: puts committed batches into OpenSearch, following its own cursor per shard.

It reads what the consumers committed (the manifest and its archive objects),
never the stream, so an OpenSearch outage pauses indexing only: archiving and
aggregation go on, and the cursor catches up when OpenSearch is back. Each
document's `_id` is the event id and documents are only created, so indexing
a batch twice changes nothing and counts nothing twice.
Bulk item errors are sorted one by one: 429 and 5xx are retried, anything
else is recorded in `index_failures` with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import ray
from botocore.exceptions import ClientError

from lap import metrics
from lap.audit.actor import AUDIT_ACTOR, NAMESPACE
from lap.audit.receipts import StageTally
from lap.audit.shards import shard_view
from lap.audit.tombstones import INDEX_LOCK, Tombstones
from lap.buckets import parse_time
from lap.caliper import iri_of
from lap.process import run_in_background
from lap.settings import Settings, load_settings
from lap.sinks.archive import read_metas
from lap.sinks.index import document_id, index_name
from lap.stores import Stores

log = logging.getLogger("lap.index")

ITEM_RETRIES = 5
MAX_BACKOFF_S = 30.0
BACKLOG_EVERY_S = 5.0
LIVE_BATCHES_PER_SHARD = 8  # a pass that finds this many new batches of a shard leaves the rebuild for later
BACKFILL_BATCHES_PER_PASS = 4  # per shard
INDEX_WRITER = "lap-index-writer"


def document(line: dict[str, Any], batch_id: int) -> dict[str, Any]:
    """The searchable fields of an archived event and where the whole event is: its batch's archive object.

    The event itself stays in the archive (GET /v1/events/{id} reads it from
    there): a document is a few hundred bytes, not the event twice over. The
    actor's and object's IRIs come from the line's meta (lap.sinks.archive.read_metas),
    or from its item in lines written before the meta carried them.
    """
    meta = line["meta"]
    if "actor" in meta:
        actor, target = meta["actor"], meta["object"]
    else:
        item = line["item"]
        actor, target = iri_of(item.get("actor")), iri_of(item.get("object"))
    learner = meta.get("learner")
    doc = {  # no tenant: the index is the tenant's
        "event_id": meta["event_id"], "sensor": meta.get("sensor"),
        "type": meta.get("type"), "action": meta.get("action"), "learner": learner,
        "actor": actor, "object": target, "course": meta.get("course"),
        "event_time": meta.get("event_time"), "received_at": meta.get("received_at"), "batch": batch_id,
    }
    if actor != learner:  # a grader, say: the source keeps it (`actor` itself is searchable, not stored)
        doc["actor_iri"] = actor
    if document_id(doc["event_id"]) != doc["event_id"]:  # an id too long to be the document's own
        doc["event_iri"] = doc["event_id"]
    return doc


async def by_shard(batches: list, index_shard) -> list[int]:
    """Each shard's batches in order, the shards side by side: while OpenSearch indexes one shard's bulk, the next
    shard's batch is read and made into documents (a shard's cursor moves one batch at a time, in order).
    Every shard's work is awaited before an error is raised."""
    shards: dict[tuple, list] = {}
    for batch in batches:  # a rebuild also goes through each replay's batches of a shard, with a cursor of its own
        shards.setdefault((batch.get("stream"), batch["shard_id"]), []).append(batch)
    results = await asyncio.gather(*(index_shard(group) for group in shards.values()), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


class IndexOutage(Exception):
    """OpenSearch cannot take documents now; the batch is tried again later."""


class CursorMoved(Exception):
    """The cursor changed under this pass (the index was reset): start the pass again from it."""


@ray.remote(max_restarts=-1, max_task_retries=-1)
class IndexWriter:
    def __init__(self) -> None:
        self.settings = load_settings()
        if self.settings.process.background_cpu:
            run_in_background()
        self._task: asyncio.Task | None = None
        self.live_behind = False  # the last pass found a full page of new batches for some shard
        self.tombstones = Tombstones()

    def pid(self) -> int:
        """Its worker process, for operators (and the fault tests) to find it."""
        return os.getpid()

    async def run(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.shield(self._task)

    async def _run(self) -> None:
        s = self.settings
        async with Stores(s, pool=True, background=True, s3=True, search=True) as stores:
            self.pool, self.s3, self.search = stores.pool, stores.s3, stores.search
            delay = s.process.index_retry_s
            backlog_at = 0.0
            while True:
                if time.monotonic() - backlog_at >= BACKLOG_EVERY_S:  # also while OpenSearch is away
                    backlog_at = time.monotonic()
                    await self.report_backlog()
                try:
                    done = await self.pass_once()
                    if not self.live_behind:  # new events first: a rebuild takes the time that is left
                        done += await self.backfill_once()
                    delay = s.process.index_retry_s
                except Exception as exc:  # OpenSearch (or Postgres) away: wait, then pick up where the cursor is
                    log.warning("indexing paused for %.0f s: %s", delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF_S)
                    continue
                if not done:
                    await asyncio.sleep(0.5)

    async def report_backlog(self) -> None:
        """Committed batches each shard has not indexed yet, for the `lap_index_backlog_batches` metric."""
        try:
            async with self.pool.acquire() as conn:
                rows = await shard_view(conn, self.settings.stream.name)
        except Exception as exc:  # Postgres away: the next pass reports it
            log.warning("index backlog not measured: %s", exc)
            return
        try:
            for row in rows:
                metrics.index_backlog_batches().set(row["index_backlog"], tags={"shard": row["shard_id"]})
        except Exception as exc:  # a metric must never stop indexing
            log.warning("index backlog not reported: %s", exc)

    async def pass_once(self) -> int:
        """Index the next committed batches of every shard; returns how many batches were indexed."""
        stream = self.settings.stream.name
        async with self.pool.acquire() as conn:
            batches = await conn.fetch(
                """SELECT b.id, b.shard_id, b.first_seq, b.last_seq, i.last_seq AS cursor
                     FROM shard_checkpoints c
                     LEFT JOIN index_cursors i ON i.stream = c.stream AND i.shard_id = c.shard_id
                     CROSS JOIN LATERAL (
                         SELECT id, shard_id, first_seq, last_seq FROM batches b
                          WHERE b.stream = c.stream AND b.shard_id = c.shard_id
                            AND (i.last_seq IS NULL OR b.first_seq > i.last_seq)
                          ORDER BY b.first_seq LIMIT $2) b
                    WHERE c.stream = $1
                    ORDER BY b.shard_id, b.first_seq""", stream, LIVE_BATCHES_PER_SHARD)
        per_shard = Counter(batch["shard_id"] for batch in batches)
        self.live_behind = bool(per_shard) and max(per_shard.values()) >= LIVE_BATCHES_PER_SHARD

        async def one_shard(batches_of_shard: list) -> int:
            cursor = batches_of_shard[0]["cursor"]
            for batch in batches_of_shard:
                await self.index_batch(batch, cursor)
                cursor = batch["last_seq"]
            return len(batches_of_shard)

        try:
            return sum(await by_shard(batches, one_shard))
        except CursorMoved:
            log.info("an index cursor was reset; indexing again from it")
            return 1

    async def backfill_once(self) -> int:
        """Index the next batches of an index rebuild (oldest first, behind the live cursors); returns how many.

        A shard whose backfill has nothing left loses its `index_backfill` row: the rebuild is over when none is left.
        """
        stream = self.settings.stream.name
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT f.stream, f.shard_id, f.after_seq AS cursor, b.id, b.first_seq, b.last_seq
                     FROM index_backfill f
                     LEFT JOIN LATERAL (
                         SELECT id, first_seq, last_seq FROM batches b
                          WHERE b.stream = f.stream AND b.shard_id = f.shard_id AND b.last_seq <= f.until_seq
                            AND (f.after_seq IS NULL OR b.first_seq > f.after_seq)
                            AND (f.since IS NULL OR b.max_received_at >= f.since)
                          ORDER BY b.first_seq LIMIT $2) b ON true
                    WHERE f.stream = $1 OR f.stream LIKE 'replay:%'
                    ORDER BY f.stream, f.shard_id, b.first_seq""", stream, BACKFILL_BATCHES_PER_PASS)
            finished = sorted({(r["stream"], r["shard_id"]) for r in rows if r["id"] is None})
            for done_stream, shard in finished:
                await conn.execute("DELETE FROM index_backfill WHERE stream = $1 AND shard_id = $2", done_stream,
                                   shard)
            if finished:
                log.info("index rebuild of %s done", ", ".join(f"{st} {sh}" for st, sh in finished))
        async def one_shard(batches_of_shard: list) -> int:
            cursor = batches_of_shard[0]["cursor"]
            for batch in batches_of_shard:
                await self.index_batch(batch, cursor, backfill=True)
                cursor = batch["last_seq"]
            return len(batches_of_shard)

        try:
            return sum(await by_shard([r for r in rows if r["id"] is not None], one_shard))
        except CursorMoved:
            return 1


    async def index_batch(self, batch, cursor: Decimal | None, backfill: bool = False) -> None:
        """Index one committed batch and move its cursor (the live one, or the rebuild's with `backfill`).

        The whole batch holds INDEX_LOCK shared: an erasure that begins waits for it, and one that began before
        it is in the tombstones it filters by (lap.audit.tombstones)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", INDEX_LOCK)
            await self.tombstones.refresh(conn)
            indexed = await self._index_batch(conn, batch, cursor, backfill)
        if backfill:
            return  # the audit actor follows the live cursor
        try:
            audit = ray.get_actor(AUDIT_ACTOR, namespace=NAMESPACE)
            audit.index_report.remote(batch["shard_id"], str(batch["last_seq"]), indexed)
        except ValueError:
            pass

    async def _index_batch(self, conn, batch, cursor: Decimal | None, backfill: bool) -> int:
        keys = [r["key"] for r in await conn.fetch(
            "SELECT key FROM archive_objects WHERE batch_id = $1 ORDER BY key", batch["id"])]
        lines: list[dict[str, Any]] = []
        for key in keys:
            try:
                lines.extend(await read_metas(self.s3, self.settings, key))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                    raise
                # reconcile reports these events as missing from the archive and the index; replay repairs both
                log.error("archive object %s of batch %s is gone; its events are not indexed", key, batch["id"])
        if self.tombstones:  # an erasure that began after the batch was committed takes its events out itself
            lines = [line for line in lines if self.tombstones.erasure_of(line["meta"]) is None]
        failures: list[tuple] = []
        indexed: list[dict[str, Any]] = []  # new documents only: an event indexed again is not counted again
        size = self.settings.process.index_batch_docs
        for start in range(0, len(lines), size):
            _, created, failed = await self.bulk(lines[start:start + size], batch["id"])
            indexed.extend(created)
            failures.extend((line["meta"]["tenant"], line["meta"]["event_id"], batch["id"], status, reason)
                            for line, status, reason in failed)
        counts = StageTally()
        times: dict[str, datetime] = {}  # a stream record's events share their receipt time
        for line in indexed:
            meta = line["meta"]
            text = meta["received_at"]
            received = times.get(text) or times.setdefault(text, parse_time(text))
            counts.count(meta["tenant"], meta.get("sensor"), batch["shard_id"], received, "indexed")
        if failures:
            await conn.executemany(
                """INSERT INTO index_failures (tenant, event_id, batch_id, status, reason) VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (tenant, event_id) DO UPDATE
                      SET batch_id = excluded.batch_id, status = excluded.status, reason = excluded.reason,
                          failed_at = now()""", failures)
        await counts.write(conn)
        # compare-and-set: if the cursor was reset meanwhile, this batch's counts must not stand
        if backfill:
            moved = await conn.execute(
                """UPDATE index_backfill SET after_seq = $3, batches_done = batches_done + 1
                    WHERE stream = $1 AND shard_id = $2 AND after_seq IS NOT DISTINCT FROM $4""",
                batch["stream"], batch["shard_id"], batch["last_seq"], cursor) != "UPDATE 1"
        elif cursor is None:
            moved = await conn.execute(
                """INSERT INTO index_cursors (stream, shard_id, last_seq) VALUES ($1, $2, $3)
                   ON CONFLICT (stream, shard_id) DO NOTHING""",
                self.settings.stream.name, batch["shard_id"], batch["last_seq"]) != "INSERT 0 1"
        else:
            moved = await conn.execute(
                """UPDATE index_cursors SET last_seq = $3, updated_at = now()
                    WHERE stream = $1 AND shard_id = $2 AND last_seq = $4""",
                self.settings.stream.name, batch["shard_id"], batch["last_seq"], cursor) != "UPDATE 1"
        if moved:
            raise CursorMoved()
        return len(indexed)

    async def bulk(self, lines: list[dict[str, Any]], batch_id: int):
        return await bulk_index(self.search, self.settings, lines, batch_id)


async def bulk_index(search, settings: Settings, lines: list[dict[str, Any]], batch_id: int,
                     earlier_tries: bool = True) -> tuple[list[dict], list[dict], list[tuple[dict, int, str]]]:
    """Index `lines` (archived by batch `batch_id`); returns (indexed, of those the ones to count,
    [(line, status, reason) refused for good]).

    Documents are created, never overwritten. With `earlier_tries` (the index
    writer), one that exists already counts when an earlier try of this same
    batch made it: a writer that died between the bulk and its commit counted
    nothing. Without (a replay, which commits no cursor), only the documents
    this call created count. So every event is counted once, whoever indexed
    it first. Raises IndexOutage when OpenSearch cannot be reached or keeps
    failing whole items.
    """
    pending = lines
    ok: list[dict] = []
    created: list[dict] = []
    existing: list[dict] = []
    refused: list[tuple[dict, int, str]] = []
    delay = settings.process.index_retry_s
    actions: dict[str, bytes] = {}  # the start of a create action, per tenant
    for attempt in range(ITEM_RETRIES + 1):
        body = bytearray()
        for line in pending:
            meta = line["meta"]
            tenant = meta["tenant"]
            action = actions.get(tenant)
            if action is None:
                action = actions[tenant] = b'{"create":{"_index":' + orjson.dumps(index_name(settings, tenant)) \
                    + b',"_id":'
            body += action + orjson.dumps(document_id(meta["event_id"])) + b"}}\n"
            body += orjson.dumps(document(line, batch_id)) + b"\n"
        # each item's status and error only: OpenSearch writes less, and the client parses less
        reply = await search.bulk(body=bytes(body), params={"filter_path": "items.*.status,items.*.error"})
        retry: list[dict] = []
        for line, result in zip(pending, reply["items"]):
            outcome = next(iter(result.values()))
            status = outcome.get("status", 500)
            if status < 300:
                ok.append(line)
                created.append(line)
            elif status == 409:
                ok.append(line)
                existing.append(line)
            elif status == 429 or status >= 500:
                retry.append(line)
            else:
                error = outcome.get("error")
                reason = (error.get("reason") if isinstance(error, dict) else str(error)) or f"status {status}"
                refused.append((line, status, reason[:1000]))
        if not retry:
            break
        pending = retry
        if attempt < ITEM_RETRIES:
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)
    else:
        raise IndexOutage(f"{len(pending)} documents still refused with 429/5xx after {ITEM_RETRIES} retries")
    if existing and earlier_tries:
        created.extend(await made_by_batch(search, settings, existing, batch_id))
    return ok, created, refused


async def made_by_batch(search, settings: Settings, lines: list[dict[str, Any]], batch_id: int) -> list[dict]:
    """Of these lines, whose documents exist already, those an earlier try of batch `batch_id` indexed."""
    by_index: dict[str, list[dict]] = {}
    for line in lines:
        by_index.setdefault(index_name(settings, line["meta"]["tenant"]), []).append(line)
    ours: list[dict] = []
    for name, group in by_index.items():
        reply = await search.mget(index=name, body={"ids": [document_id(line["meta"]["event_id"]) for line in group]},
                                  params={"_source_includes": "batch"})
        for line, doc in zip(group, reply["docs"]):
            if doc.get("found") and (doc.get("_source") or {}).get("batch") == batch_id:
                ours.append(line)
    return ours
