"""Erasure: a learner's events taken out of every store LAP keeps them in, with a tombstone that proves it.

An erasure is asked for (`DELETE /v1/learners/{iri}`, `lap erase`), and from
that moment its tombstone keeps the learner's new events out of every store
(lap.audit.tombstones). A job then takes out what is already stored, one
archive object at a time, each step safe to run again after a stop:

1. each archive object that may hold the learner (its `learners` hashes) is
   read; if it does, the object without the learner's lines is written beside
   it, its receipt objects name those events by fingerprint instead of id, and
   ONE transaction switches the manifest to the new object, takes the events'
   figures out of the aggregates, moves their audit counters from archived and
   aggregated to erased, and records each event (`erased_events`);
2. holding the index lock (no index writer is in a batch), the documents of
   those events are looked up, their `indexed` counters taken back, and then
   deleted; the old objects are deleted too;
3. the learner's aggregate rows, now at zero, are deleted, and any document of
   the learner the index still holds is removed and counted;
4. the tombstone records how many events each store gave up, and forgets the
   learner's IRI.

Events of the learner still in the stream, resent later, or in a dead letter are
dropped by the writers that meet them, and counted erased. Refused requests kept
in the quarantine that name the learner lose their payload; the refusal (when,
which sensor, why) stays.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from urllib.parse import quote
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import orjson
from botocore.exceptions import ClientError

from lap.audit.jobs import JobTasks, progress_recorder, save_progress
from lap.audit.receipts import StageTally, rewrite_receipts
from lap.audit.replay import tenant_jobs_lock
from lap.audit.tombstones import INDEX_LOCK, STORE_LOCK, learner_hash, signed64
from lap.buckets import hour_of, parse_time
from lap.ingest.quarantine import strings_in
from lap.process.aggregate import aggregate_records
from lap.process.batch import negated, write_aggregates
from lap.process.dedup import fingerprint
from lap.settings import Settings
from lap.sinks.archive import read_lines, erased_key, hour_prefix, learner_hash32, pack_lines, put_object
from lap.sinks.index import document_id, index_name
from lap.stream import record_format
from lap.stream.record_format import line_meta

log = logging.getLogger("lap.erasure")

READ_CONCURRENCY = 8
MGET_CHUNK = 1000
ERASURE_STALE_S = 30.0  # a running erasure whose heartbeat is older than this lost its process
ERASURE_WATCH_S = 10.0
ERASURE_MAX_RUNS = 5


class ErasureRefused(ValueError):
    """An erasure LAP will not start (the text says why): a 404 on the API, an error on the command line."""


class ErasureBusy(Exception):
    """The tombstone could not be written within TOMBSTONE_WAIT_S (a writer held its batch that long): retry."""


TOMBSTONE_WAIT_S = 15  # how long writing a tombstone waits for the batches being written


async def write_tombstone(conn, tenant: str, learner_hash: str | None, learner: str | None, requested_by: str):
    """Insert the tombstone holding the index and store locks exclusively (lap.audit.tombstones); None if one
    was there already."""
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{TOMBSTONE_WAIT_S}s'")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", INDEX_LOCK)
            await conn.execute("SELECT pg_advisory_xact_lock($1)", STORE_LOCK)
            return await conn.fetchrow(
                """INSERT INTO erasures (job_id, tenant, learner_hash, learner, requested_by, status)
                   VALUES ($1, $2, $3, $4, $5, 'running')
                   ON CONFLICT (tenant, coalesce(learner_hash, '')) DO NOTHING RETURNING *""",
                new_job_id(), tenant, learner_hash, learner, requested_by)
    except asyncpg.exceptions.LockNotAvailableError:
        raise ErasureBusy(f"the pipeline's writers did not pause within {TOMBSTONE_WAIT_S} s (is OpenSearch "
                          "slow?); ask again") from None


def learner_forms(learner: str) -> list[str]:
    """How the learner's IRI can appear in a request's text: as is, and as JSON writes it (escaped quotes and
    backslashes, and slashes escaped the way some encoders do)."""
    escaped = orjson.dumps(learner).decode()[1:-1]
    return list(dict.fromkeys([learner, escaped, escaped.replace("/", "\\/")]))


def names_learner(text: str, learner: str) -> bool:
    """The text (a kept payload, its problems) holds the learner's IRI, written in any JSON escaping when the
    text parses as JSON."""
    if any(form in text for form in learner_forms(learner)):
        return True
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return any(learner in value for value in strings_in(doc))


def kept_payload(kept: dict[str, Any]) -> str:
    """A quarantined request's payload as text (a payload that was not UTF-8 is kept in base64)."""
    payload = kept.get("payload") or ""
    if kept.get("payload_encoding") == "base64":
        return base64.b64decode(payload).decode("utf-8", errors="replace")
    return payload


def blank_learner(problems: list[dict[str, Any]], learner: str) -> list[dict[str, Any]]:
    """The problems of a refusal with the learner's IRI taken out of their messages."""
    out = []
    for problem in problems:
        message = problem.get("message")
        if isinstance(message, str):
            for form in learner_forms(learner):
                message = message.replace(form, "[erased learner]")
            problem = {**problem, "message": message}
        out.append(problem)
    return out


def new_job_id() -> str:
    return "er-" + uuid.uuid4().hex[:12]


async def request_erasure(pool, tenant: str, learner: str, requested_by: str) -> tuple[dict[str, Any], bool]:
    """The learner's tombstone, and whether it is new. Raises ErasureRefused for a learner LAP holds nothing of.

    The tombstone is written holding the index and store locks exclusively: it waits for the batches being
    written, and every batch after it filters the learner out."""
    digest = learner_hash(tenant, learner)
    async with pool.acquire() as conn:
        existing = await conn.fetchrow("SELECT * FROM erasures WHERE tenant = $1 AND learner_hash = $2", tenant,
                                       digest)
        if existing is not None:
            return dict(existing), False
        known = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM learner_days WHERE tenant = $1 AND learner = $2)", tenant, learner)
        if not known:
            raise ErasureRefused("LAP holds no processed events of this learner (their figures are empty); nothing "
                                 "to erase. Events sent in the last minutes count once processed: ask again then")
        row = await write_tombstone(conn, tenant, digest, learner, requested_by)
        if row is None:  # asked for twice at once: the other request won
            return dict(await conn.fetchrow("SELECT * FROM erasures WHERE tenant = $1 AND learner_hash = $2",
                                            tenant, digest)), False
    return dict(row), True


# The tables that hold a tenant's data, all deleted with it; its tombstones (`erasures`), its keys (revoked, kept
# as hashes) and its name (`tenants`, marked deleted) stay.
TENANT_TABLES = ("learner_days", "learner_day_actions", "course_days", "course_hours", "seen_events", "receipts",
                 "quarantined", "quarantine_counts", "dead_letters", "replays", "index_failures",
                 "lost_archive_objects", "erased_events", "archive_objects", "stage_counts")


async def request_tenant_deletion(pool, tenant: str, requested_by: str) -> tuple[dict[str, Any], bool]:
    """The tenant's tombstone, and whether it is new: its keys are revoked and its name retired at once."""
    async with pool.acquire() as conn:
        if await conn.fetchval("SELECT count(*) FROM tenants WHERE name = $1", tenant) == 0:
            raise ErasureRefused(f"there is no tenant {tenant!r}")
        existing = await conn.fetchrow("SELECT * FROM erasures WHERE tenant = $1 AND learner_hash IS NULL", tenant)
        if existing is not None:
            return dict(existing), False
        async with conn.transaction():
            await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE tenant = $1 AND revoked_at IS NULL",
                               tenant)
            await conn.execute("UPDATE tenants SET deleted_at = now() WHERE name = $1", tenant)
        row = await write_tombstone(conn, tenant, None, None, requested_by)
        if row is None:
            return dict(await conn.fetchrow("SELECT * FROM erasures WHERE tenant = $1 AND learner_hash IS NULL",
                                            tenant)), False
    return dict(row), True


class Eraser:
    """Runs one erasure's job (see the module's text); `progress(step, done, total)` follows it."""

    def __init__(self, settings: Settings, pool, s3, search, progress: Callable[[str, int, int], None] | None = None):
        self.settings, self.pool, self.s3, self.search = settings, pool, s3, search
        self.progress = progress or (lambda step, done, total: None)

    async def run(self, erasure_id: int) -> dict[str, int]:
        async with self.pool.acquire() as conn:
            job = await conn.fetchrow("SELECT * FROM erasures WHERE id = $1", erasure_id)
        if job is None or job["status"] == "done":
            return {} if job is None else orjson.loads(job["counts"])
        tenant, learner = job["tenant"], job["learner"]
        lock = tenant_jobs_lock(tenant)
        async with self.pool.acquire() as conn:
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock):
                self.progress("waiting for the tenant's replay", 0, 1)
                await asyncio.sleep(1.0)
            try:
                if job["learner_hash"] is None:
                    result = await self.delete_tenant(job)
                    await conn.execute(
                        """UPDATE erasures SET status = 'done', counts = $2::jsonb, finished_at = now(), error = NULL
                            WHERE id = $1""", erasure_id, orjson.dumps(result).decode())
                    return result
                counts = Counter(orjson.loads(job["counts"]))
                await self.erase_archive(job, counts)
                counts["orphans_deleted"] += await self.erase_orphans(job)
                counts["dead_lettered"] += await self.erase_dead_letters(job)
                counts["quarantined"] = await self.erase_quarantine(job)
                await self.erase_index(job)
                await self.erase_aggregate_rows(job, counts)
                counts["index_leftovers"] += await self.erase_index_leftovers(tenant, learner)
                done = await conn.fetchrow(  # counted from what each step recorded, whichever run did it
                    """SELECT coalesce(sum(events), 0)::int AS archived, coalesce(sum(describes), 0)::int AS describes,
                              coalesce(sum(receipts), 0)::int AS receipts,
                              count(*) FILTER (WHERE new_key <> '')::int AS rewritten,
                              count(*) FILTER (WHERE new_key = '')::int AS removed
                         FROM erasure_objects WHERE erasure_id = $1""", erasure_id)
                counts.update(archived=done["archived"], aggregated=done["archived"] - done["describes"],
                              receipts=done["receipts"], objects_rewritten=done["rewritten"],
                              objects_removed=done["removed"])
                counts["indexed"] = counts["index_leftovers"] + await conn.fetchval(
                    "SELECT count(*) FROM erased_events WHERE erasure_id = $1 AND was_indexed", erasure_id)
                counts["events"] = await conn.fetchval(
                    "SELECT count(*) FROM erased_events WHERE erasure_id = $1", erasure_id)
                result = dict(sorted(counts.items()))
                await conn.execute(
                    """UPDATE erasures SET status = 'done', learner = NULL, counts = $2::jsonb, finished_at = now(),
                                           error = NULL WHERE id = $1""", erasure_id, orjson.dumps(result).decode())
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", lock)
        return result

    # --- a whole tenant ---------------------------------------------------------------------------

    async def delete_tenant(self, job) -> dict[str, int]:
        """Everything the tenant has in every store. Its counters are summed into the tombstone first (kept in
        the row, so a run after a stop keeps them); each step deletes what is left, so it can run again."""
        tenant = job["tenant"]
        counts = Counter(orjson.loads(job["counts"]))
        async with self.pool.acquire() as conn:
            if not counts:
                for r in await conn.fetch(
                        "SELECT stage, sum(events)::bigint AS n FROM stage_counts WHERE tenant = $1 GROUP BY stage",
                        tenant):
                    counts[r["stage"]] = r["n"]
                counts["learners"] = await conn.fetchval(
                    "SELECT count(DISTINCT learner) FROM learner_days WHERE tenant = $1", tenant)
                counts["started"] = 1
                await conn.execute("UPDATE erasures SET counts = $2::jsonb WHERE id = $1", job["id"],
                                   orjson.dumps(dict(counts)).decode())
            async with conn.transaction():  # no index writer is inside a batch, and the next one drops the tenant
                await conn.execute("SELECT pg_advisory_xact_lock($1)", INDEX_LOCK)
                await self.search.indices.delete(index=index_name(self.settings, tenant), ignore_unavailable=True)
        # ingest replicas know a revoked key for up to auth.key_cache_ttl_s, then flush what they counted
        settle = job["requested_at"] + timedelta(seconds=self.settings.auth.key_cache_ttl_s + 2)
        await asyncio.sleep(max(0.0, (settle - datetime.now(timezone.utc)).total_seconds()))
        a = self.settings.archive
        for name, prefix in (("archive_objects", a.prefix), ("receipt_objects", a.receipts_prefix),
                             ("dead_letter_objects", a.dead_letter_prefix),
                             ("quarantine_objects", a.quarantine_prefix)):
            counts[name] += await self.delete_prefix(f"{prefix}/tenant={quote(tenant, safe='')}/", name)
        async with self.pool.acquire() as conn, conn.transaction():
            for table in TENANT_TABLES:
                counts["rows"] += int((await conn.execute(f"DELETE FROM {table} WHERE tenant = $1", tenant)).split()[-1])
        counts.pop("started", None)
        return dict(sorted(counts.items()))

    async def delete_prefix(self, prefix: str, step: str) -> int:
        """Delete every object under `prefix`, a thousand at a time; returns how many."""
        bucket = self.settings.archive.bucket
        deleted = 0
        paginator = self.s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                await self.s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
                deleted += len(keys)
                self.progress(step, deleted, deleted)
        return deleted

    # --- 1. the archive, the receipts, the aggregates and the counters, object by object -----------

    async def erase_archive(self, job, counts: Counter) -> None:
        tenant, learner = job["tenant"], job["learner"]
        async with self.pool.acquire() as conn:
            objects = await conn.fetch(
                """SELECT o.key, o.received_hour, o.learners, b.shard_id, b.first_seq, b.last_seq
                     FROM archive_objects o JOIN batches b ON b.id = o.batch_id
                    WHERE o.tenant = $1 AND (o.learners IS NULL OR $2 = ANY(o.learners))
                    ORDER BY o.received_hour, o.key""", tenant, learner_hash32(learner))
        gate = asyncio.Semaphore(READ_CONCURRENCY)
        done = 0

        async def one(obj) -> None:
            nonlocal done
            async with gate:
                await self.erase_from_object(job, obj, counts)
            done += 1
            self.progress("archive", done, len(objects))

        self.progress("archive", 0, len(objects))
        await asyncio.gather(*(one(obj) for obj in objects))
        counts["objects_read"] += len(objects)

    def is_learners(self, job, meta: dict[str, Any]) -> bool:
        learner = meta.get("learner") or (meta["event_id"] if meta.get("kind") == "entity" else None)
        return learner == job["learner"]

    async def erase_from_object(self, job, obj, counts: Counter) -> None:
        tenant = job["tenant"]
        keep: list[bytes] = []
        learners: set[int] = set()
        gone: list[dict[str, Any]] = []
        for raw in await read_lines(self.s3, self.settings, obj["key"]):
            meta = line_meta(raw)
            if meta is None:  # written before the meta came first
                meta = orjson.loads(raw)["meta"]
            if self.is_learners(job, meta):
                gone.append(orjson.loads(raw))
            else:
                keep.append(raw)
                learners.add(learner_hash32(meta.get("learner") or meta["event_id"]))
        if not gone:
            return  # another learner shares the hash
        new_key = erased_key(obj["key"], job["id"]) if keep else None
        body = pack_lines(keep) if keep else b""
        if new_key is not None:
            await put_object(self.s3, self.settings, new_key, body)
        gone_ids = {line["meta"]["event_id"] for line in gone}
        blanked = await rewrite_receipts(self.s3, self.settings, tenant, obj["received_hour"], obj["shard_id"],
                                         int(obj["first_seq"]), int(obj["last_seq"]), gone_ids)
        tally = StageTally()
        rows = []
        for line in gone:
            meta = line["meta"]
            received = parse_time(meta["received_at"])
            sensor, shard = meta.get("sensor") or "", meta.get("shard_id") or obj["shard_id"]
            for stage in ("archived", "aggregated") + (("describes",) if meta.get("kind") == "entity" else ()):
                tally.count(tenant, sensor, shard, received, stage, -1)
            tally.count(tenant, sensor, shard, received, "erased")
            rows.append((tenant, signed64(fingerprint(tenant, meta["event_id"])), job["id"], received, sensor, shard,
                         document_id(meta["event_id"])))
        figures = negated(aggregate_records(gone))
        for attempt in range(5):
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    if new_key is None:
                        switched = await conn.execute("DELETE FROM archive_objects WHERE key = $1", obj["key"])
                    else:
                        switched = await conn.execute(
                            """UPDATE archive_objects SET key = $2, records = $3, bytes = $4, learners = $5
                                WHERE key = $1""", obj["key"], new_key, len(keep), len(body), sorted(learners))
                    if switched.endswith(" 0"):  # already switched by an earlier run: nothing to count
                        return
                    await write_aggregates(conn, figures)
                    await tally.write(conn)
                    await conn.executemany(
                        """INSERT INTO erased_events (tenant, fingerprint, erasure_id, received_at, sensor, shard_id,
                                                      document_id)
                           VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant, fingerprint) DO NOTHING""", rows)
                    await conn.execute(
                        """INSERT INTO erasure_objects (erasure_id, old_key, new_key, events, describes, receipts)
                           VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
                        job["id"], obj["key"], new_key or "", len(gone),
                        sum(1 for line in gone if line["meta"].get("kind") == "entity"), blanked)
                return
            except asyncpg.exceptions.DeadlockDetectedError:
                await asyncio.sleep(0.1 * (attempt + 1))
        raise RuntimeError(f"erasure {job['job_id']}: {obj['key']} kept deadlocking")

    async def erase_orphans(self, job) -> int:
        """Delete the tenant's orphaned objects (of batches that never committed) that hold the learner: the
        sweeper keeps them `process.orphan_grace_s`, so only that recent past is listed. A batch still being
        written that held the learner is written again without them (its commit meets the tombstone)."""
        p = self.settings.process
        since = hour_of(datetime.now(timezone.utc) - timedelta(seconds=p.orphan_grace_s + p.sweep_interval_s))
        deleted = 0
        paginator = self.s3.get_paginator("list_objects_v2")
        hour = since
        while hour <= datetime.now(timezone.utc):
            keys = []
            async for page in paginator.paginate(Bucket=self.settings.archive.bucket,
                                                 Prefix=hour_prefix(self.settings, job["tenant"], hour)):
                keys += [o["Key"] for o in page.get("Contents", [])]
            async with self.pool.acquire() as conn:
                known = {r["key"] for r in await conn.fetch("SELECT key FROM archive_objects WHERE key = ANY($1)",
                                                             keys)}
            for key in keys:
                if key in known:
                    continue
                try:
                    lines = await read_lines(self.s3, self.settings, key)
                except ClientError:  # gone meanwhile (the sweeper, or a batch's retry)
                    continue
                if any(self.is_learners(job, line_meta(raw) or orjson.loads(raw)["meta"]) for raw in lines):
                    await self.s3.delete_object(Bucket=self.settings.archive.bucket, Key=key)
                    deleted += 1
            hour += timedelta(hours=1)
        return deleted

    async def erase_dead_letters(self, job) -> int:
        """Take the learner's events out of the tenant's open dead letters (records a consumer could not process,
        kept as read): the record is written again without them, their receipts renamed, their counters moved
        to erased; a dead letter left empty is closed. Returns how many events went."""
        tenant = job["tenant"]
        async with self.pool.acquire() as conn:
            letters = await conn.fetch(
                """SELECT stream, shard_id, sequence_number, key, received_at FROM dead_letters
                    WHERE tenant = $1 AND replayed_at IS NULL""", tenant)
        erased = 0
        for letter in letters:
            reply = await self.s3.get_object(Bucket=self.settings.archive.bucket, Key=letter["key"])
            async with reply["Body"] as body:
                kept = orjson.loads(await body.read())
            data = base64.b64decode(kept["data_base64"])
            try:
                events = record_format.decode_lines(data)
            except record_format.NotLapRecord:
                continue
            gone = [meta for meta, _, _ in events if self.is_learners(job, meta)]
            if not gone:
                continue
            left = [(meta, item) for meta, item, _ in events if not self.is_learners(job, meta)]
            shared = {k: v for k, v in gone[0].items() if k in record_format.SHARED_FIELDS}
            lines = [record_format.event_line({k: v for k, v in meta.items() if k not in shared}, item)
                     for meta, item in left]
            kept["data_base64"] = base64.b64encode(record_format.encode(shared, lines)).decode()
            kept["erased_events"] = kept.get("erased_events", 0) + len(gone)
            await self.s3.put_object(Bucket=self.settings.archive.bucket, Key=letter["key"],
                                     Body=orjson.dumps(kept), ContentType="application/json")
            sequence = int(letter["sequence_number"])
            await rewrite_receipts(self.s3, self.settings, tenant, hour_of(letter["received_at"]),
                                   letter["shard_id"], sequence, sequence, {m["event_id"] for m in gone})
            tally = StageTally()
            for meta in gone:
                tally.count(tenant, meta.get("sensor"), letter["shard_id"], parse_time(meta["received_at"]), "erased")
            async with self.pool.acquire() as conn, conn.transaction():
                await tally.write(conn)
                await conn.executemany(
                    """INSERT INTO erased_events (tenant, fingerprint, erasure_id, received_at, sensor, shard_id)
                       VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, fingerprint) DO NOTHING""",
                    [(tenant, signed64(fingerprint(tenant, m["event_id"])), job["id"], parse_time(m["received_at"]),
                      m.get("sensor") or "", letter["shard_id"]) for m in gone])
                await conn.execute(
                    """UPDATE dead_letters SET events = events - $4,
                              replayed_at = CASE WHEN events - $4 <= 0 THEN now() END,
                              replay_id = CASE WHEN events - $4 <= 0 THEN $5 END
                        WHERE stream = $1 AND shard_id = $2 AND sequence_number = $3""",
                    letter["stream"], letter["shard_id"], letter["sequence_number"], len(gone), job["job_id"])
            erased += len(gone)
        return erased

    async def erase_quarantine(self, job) -> int:
        """Refused requests of the tenant whose kept payload or problems name the learner: the payload is dropped
        from the kept object and the IRI blanked in the problems; the refusal itself stays, counted as before.
        Only those whose `learners` hashes may hold the learner (or that have none) are read. Returns how many
        this erasure emptied, whichever run did it."""
        tenant, learner = job["tenant"], job["learner"]
        marker = job["job_id"]
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(  # those that may name the learner (a hash may be shared: read for nothing)
                """SELECT request_id, object_key, problems FROM quarantined
                    WHERE tenant = $1 AND (learners IS NULL OR $2 = ANY(learners))""", tenant, learner_hash32(learner))
        gate = asyncio.Semaphore(READ_CONCURRENCY)
        emptied = done = 0

        async def one(row) -> None:
            nonlocal emptied, done
            async with gate:
                try:
                    reply = await self.s3.get_object(Bucket=self.settings.archive.bucket, Key=row["object_key"])
                    async with reply["Body"] as body:
                        kept = orjson.loads(await body.read())
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                        raise  # S3 away: the job stops here and is resumed
                    kept = None  # its payload is gone already (the sweeper): the problems may still name them
                already = kept is not None and kept.get("payload_erased_by") == marker  # an earlier run did it
                in_payload = kept is not None and not already and names_learner(kept_payload(kept), learner)
                in_problems = names_learner(row["problems"], learner)
                if kept is not None and not already and (in_payload or in_problems):
                    kept.update(payload="", payload_encoding="utf-8", payload_erased_by=marker,
                                problems=blank_learner(kept.get("problems", []), learner))
                    await self.s3.put_object(Bucket=self.settings.archive.bucket, Key=row["object_key"],
                                             Body=orjson.dumps(kept), ContentType="application/json")
                if in_problems:
                    async with self.pool.acquire() as conn:
                        await conn.execute("UPDATE quarantined SET problems = $2::jsonb WHERE request_id = $1",
                                           row["request_id"],
                                           orjson.dumps(blank_learner(orjson.loads(row["problems"]), learner)).decode())
                emptied += already or in_payload or in_problems
            done += 1
            self.progress("quarantine", done, len(rows))

        self.progress("quarantine", 0, len(rows))
        await asyncio.gather(*(one(row) for row in rows))
        return emptied

    # --- 2. the index, and the old objects ------------------------------------------------------

    async def erase_index(self, job) -> None:
        """Take the erased events' documents out of the index, and their `indexed` counters back, once each."""
        name = index_name(self.settings, job["tenant"])
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", INDEX_LOCK)
                pending = await conn.fetch(
                    """SELECT fingerprint, document_id, received_at, sensor, shard_id FROM erased_events
                        WHERE erasure_id = $1 AND document_id IS NOT NULL AND NOT index_counted""", job["id"])
                tally = StageTally()
                found = []
                for start in range(0, len(pending), MGET_CHUNK):
                    chunk = pending[start:start + MGET_CHUNK]
                    reply = await self.search.mget(index=name, body={"ids": [r["document_id"] for r in chunk]},
                                                   params={"_source": "false"}, ignore=[404])
                    for row, doc in zip(chunk, reply.get("docs", [])):
                        if doc.get("found"):
                            tally.count(job["tenant"], row["sensor"], row["shard_id"], row["received_at"], "indexed",
                                        -1)
                            found.append(row["fingerprint"])
                await tally.write(conn)
                await conn.execute(
                    """UPDATE erased_events SET index_counted = true, was_indexed = fingerprint = ANY($2::bigint[])
                        WHERE erasure_id = $1 AND document_id IS NOT NULL AND NOT index_counted""", job["id"], found)
                # no index writer is inside a batch now, and the next reads the manifest's new keys
                old = await conn.fetch(
                    "SELECT old_key FROM erasure_objects WHERE erasure_id = $1 AND NOT old_deleted", job["id"])
                for row in old:
                    await self.s3.delete_object(Bucket=self.settings.archive.bucket, Key=row["old_key"])
                await conn.execute("UPDATE erasure_objects SET old_deleted = true WHERE erasure_id = $1", job["id"])
            ids = await conn.fetch(
                "SELECT fingerprint, document_id FROM erased_events WHERE erasure_id = $1 AND document_id IS NOT NULL",
                job["id"])
        for start in range(0, len(ids), MGET_CHUNK):
            chunk = ids[start:start + MGET_CHUNK]
            body = b"".join(b'{"delete":{"_index":' + orjson.dumps(name) + b',"_id":' +
                            orjson.dumps(r["document_id"]) + b"}}\n" for r in chunk)
            await self.search.bulk(body=body, params={"filter_path": "errors"})
            async with self.pool.acquire() as conn:
                await conn.execute(
                    """UPDATE erased_events SET document_id = NULL
                        WHERE tenant = $1 AND fingerprint = ANY($2::bigint[])""",
                    job["tenant"], [r["fingerprint"] for r in chunk])
            self.progress("index", start + len(chunk), len(ids))

    # --- 3. what is left --------------------------------------------------------------------------

    async def erase_aggregate_rows(self, job, counts: Counter) -> None:
        """Delete the learner's aggregate rows (at zero now, unless some event was stored somewhere the archive
        does not say: then counted as `aggregate_rows_not_zero`), and course rows left at zero."""
        tenant, learner = job["tenant"], job["learner"]
        async with self.pool.acquire() as conn, conn.transaction():
            left = await conn.fetchval(
                "SELECT count(*) FROM learner_days WHERE tenant = $1 AND learner = $2 AND events <> 0", tenant, learner)
            counts["aggregate_rows_not_zero"] += left
            counts["aggregate_rows"] += int((await conn.execute(
                "DELETE FROM learner_days WHERE tenant = $1 AND learner = $2", tenant, learner)).split()[-1])
            await conn.execute("DELETE FROM learner_day_actions WHERE tenant = $1 AND learner = $2", tenant, learner)
            await conn.execute("DELETE FROM course_days WHERE tenant = $1 AND events = 0", tenant)
            await conn.execute("DELETE FROM course_hours WHERE tenant = $1 AND events = 0", tenant)
        if left:
            log.error("erasure %s: %d aggregate rows of the learner were not at zero; deleted", job["job_id"], left)

    async def erase_index_leftovers(self, tenant: str, learner: str) -> int:
        """Documents of the learner the index holds still (a batch lost after it was indexed, say): their
        `indexed` counters taken back and the documents deleted, holding the index lock. Another learner's event
        the learner acted in (a peer's grade) is that learner's, and stays."""
        name = index_name(self.settings, tenant)
        await self.search.indices.refresh(index=name, ignore_unavailable=True)
        body = {"size": 10_000, "_source": ["received_at", "sensor", "batch"], "query": {"term": {"learner": learner}}}
        reply = await self.search.search(index=name, body=body, ignore_unavailable=True)
        hits = reply.get("hits", {}).get("hits", [])
        if not hits:
            return 0
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", INDEX_LOCK)
            shards = {r["id"]: r["shard_id"] for r in await conn.fetch(
                "SELECT id, shard_id FROM batches WHERE id = ANY($1)",
                sorted({h["_source"].get("batch") for h in hits if h["_source"].get("batch") is not None}))}
            tally = StageTally()
            for hit in hits:
                doc = hit["_source"]
                tally.count(tenant, doc.get("sensor"), shards.get(doc.get("batch"), ""),
                            parse_time(doc["received_at"]), "indexed", -1)
            await tally.write(conn)
            ids = [h["_id"] for h in hits]
            lines = b"".join(b'{"delete":{"_index":' + orjson.dumps(name) + b',"_id":' + orjson.dumps(i) + b"}}\n"
                             for i in ids)
            await self.search.bulk(body=lines, params={"filter_path": "errors", "refresh": "true"})
        log.warning("erasure: %d documents of the learner were in the index without an archived event; deleted",
                    len(ids))
        return len(ids)


class ErasureJobs(JobTasks):
    """The erasure jobs this process runs, and the watcher that resumes those whose process stopped."""

    def __init__(self, settings: Settings, pool, s3, search):
        super().__init__()
        self.settings, self.pool, self.s3, self.search = settings, pool, s3, search

    def start(self, erasure_id: int, job_id: str) -> None:
        self.spawn(job_id, lambda progress: self.run(erasure_id, job_id, progress))

    async def watch(self) -> None:
        while True:
            try:
                async with self.pool.acquire() as conn:
                    rows = await conn.fetch(
                        """UPDATE erasures SET heartbeat_at = now(), attempts = attempts + 1
                            WHERE status = 'running' AND heartbeat_at < now() - make_interval(secs => $1)
                            RETURNING id, job_id, attempts""", ERASURE_STALE_S)
                for r in rows:
                    log.warning("resuming erasure %s (run %d): the process running it stopped", r["job_id"],
                                r["attempts"])
                    self.start(r["id"], r["job_id"])
            except Exception as exc:  # Postgres away: try again at the next round
                log.warning("erasure watcher: %s", exc)
            await asyncio.sleep(ERASURE_WATCH_S)

    async def run(self, erasure_id: int, job_id: str, progress: dict[str, Any] | None = None,
                  report=None) -> dict[str, Any]:
        """Run the erasure to its end, saving progress and a heartbeat; {"status", "counts", "error"}."""
        progress = {} if progress is None else progress
        beat = asyncio.get_running_loop().create_task(save_progress(
            self.pool, """UPDATE erasures SET progress = $2::jsonb, heartbeat_at = now()
                           WHERE id = $1 AND status = 'running'""", erasure_id, progress, f"erasure {job_id}"))
        try:
            counts = await Eraser(self.settings, self.pool, self.s3, self.search,
                                  progress_recorder(progress, report)).run(erasure_id)
            return {"status": "done", "counts": counts, "error": None}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a store went away: the watcher runs it again (it is safe to)
            log.exception("erasure %s stopped; it will be resumed", job_id)
            async with self.pool.acquire() as conn:
                attempts = await conn.fetchval(
                    """UPDATE erasures SET error = $2, heartbeat_at = now() - make_interval(secs => $3)
                        WHERE id = $1 RETURNING attempts""", erasure_id, f"{type(exc).__name__}: {exc}",
                    ERASURE_STALE_S)
                if attempts is not None and attempts >= ERASURE_MAX_RUNS:
                    await conn.execute("UPDATE erasures SET status = 'failed', finished_at = now() WHERE id = $1",
                                       erasure_id)
            return {"status": "failed" if attempts and attempts >= ERASURE_MAX_RUNS else "running", "counts": None,
                    "error": f"{type(exc).__name__}: {exc}"}
        finally:
            beat.cancel()
            self.live.pop(job_id, None)


async def run_unless_elsewhere(settings: Settings, pool, s3, search, row, created: bool, report=None):
    """Run an erasure in this process (the command line) unless it is done, or running in a live process:
    (its row, how it ended, or None when it did not run here)."""
    if not created:
        async with pool.acquire() as conn:
            row = await conn.fetchrow("SELECT *, heartbeat_at < now() - make_interval(secs => $2) AS stale "
                                      "FROM erasures WHERE id = $1", row["id"], ERASURE_STALE_S)
            if row["status"] == "done" or (row["status"] == "running" and not row["stale"]):
                return row, None
            await conn.execute("UPDATE erasures SET status = 'running', heartbeat_at = now(), error = NULL "
                               "WHERE id = $1", row["id"])
    return row, await ErasureJobs(settings, pool, s3, search).run(row["id"], row["job_id"], report=report)
