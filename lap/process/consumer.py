"""ShardConsumer: one Ray actor per shard, with the record-processor lifecycle of the Kinesis Client Library.

initialize (take the lease, read the checkpoint) -> process batches (each one
committed with its checkpoint) -> shutdown: TERMINATE when a closed shard is
fully read (the shard is marked finished, so its children may start), or
ZOMBIE when the lease was lost (stop without committing anything more).

The actor runs with `max_restarts=-1` and `max_task_retries=-1`: when it dies,
Ray starts it again and re-runs `run`, which resumes from the checkpoint.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
import random
import time
from datetime import datetime, timezone
from typing import Any

import aiohttp
import ray
from botocore.exceptions import ClientError

from lap import metrics
from lap.audit.actor import AUDIT_ACTOR, NAMESPACE
from lap.process import leases
from lap.process.batch import POISON, BatchResult, BatchWriter, Decoded, decode_record
from lap.process.dedup import DedupState, DedupStore
from lap.process import run_in_background
from lap.settings import Settings, load_settings
from lap.stores import Stores
from lap.stream import record_format
from lap.stream.kinesis import list_shards
from lap.stream.producer import Producer, Record, partition_key_for
from lap.stream.record_format import NotLapRecord, StreamRecord
from lap.stream.records_client import RecordsClient

log = logging.getLogger("lap.process")

DEDUP_SAVE_EVERY_S = 10.0  # how often closed dedup buckets are looked for and saved
RETRIABLE_READ = {"ProvisionedThroughputExceededException", "LimitExceededException", "KMSThrottlingException",
                  "InternalFailure", "ServiceUnavailable"}


class ShardEnd(enum.Enum):
    """How a consumer's run of its shard ended, as the Kinesis Client Library names it."""

    TERMINATE = "terminate"  # the shard is closed (split or merged) and every record is processed: never again
    ZOMBIE = "zombie"  # another consumer took the lease: this one stops without writing anything more


class ShardReader:
    """GetRecords in a loop: backoff on throttling and on empty reads, a fresh iterator when one expires."""

    def __init__(self, settings: Settings, kinesis: Any, records: RecordsClient, shard_id: str, after: int | None):
        self.settings = settings
        self.kinesis = kinesis
        self.records = records
        self.shard_id = shard_id
        self.after = after  # last sequence number handed out
        self.iterator: str | None = None
        self.closed = False  # the shard is closed and every record was read
        self.lag_ms: int | None = None

    async def _iterator(self) -> str:
        kwargs: dict[str, Any] = {"StreamName": self.settings.stream.name, "ShardId": self.shard_id}
        if self.after is None:
            kwargs["ShardIteratorType"] = "TRIM_HORIZON"
        else:
            kwargs["ShardIteratorType"] = "AFTER_SEQUENCE_NUMBER"
            kwargs["StartingSequenceNumber"] = str(self.after)
        reply = await self.kinesis.get_shard_iterator(**kwargs)
        return reply["ShardIterator"]

    async def read(self) -> list[StreamRecord]:
        """The next records (possibly none); sets `closed` once a closed shard is drained."""
        if self.iterator is None:
            self.iterator = await self._iterator()
        delay = self.settings.process.idle_poll_s
        # transport errors are asked again for this long: with the lease renewed every third of its life before
        # the read, it cannot lapse meanwhile
        give_up_at = time.monotonic() + self.settings.process.lease_ttl_s / 2
        while True:
            try:
                reply = await self.records.get_records(self.iterator, self.settings.process.get_records_limit)
                break
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code == "ExpiredIteratorException":
                    self.iterator = await self._iterator()
                    continue
                if code not in RETRIABLE_READ:
                    raise
            except (OSError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                # a connection the stream closed under the call, or the stream away for a moment: a read is
                # asked again with the same iterator (it changes nothing), rather than the consumer restarted
                if time.monotonic() > give_up_at:
                    raise
                log.warning("shard %s: GetRecords failed (%s: %s); asking again", self.shard_id,
                            type(exc).__name__, exc)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.settings.process.max_poll_s)
        records = [StreamRecord.from_get_records(r) for r in reply.get("Records", [])]
        self.lag_ms = reply.get("MillisBehindLatest")
        self.iterator = reply.get("NextShardIterator")
        if records:
            self.after = records[-1].sequence
        if self.iterator is None:
            self.closed = True
        return records


@ray.remote(max_restarts=-1, max_task_retries=-1)
class ShardConsumer:
    def __init__(self, shard_id: str):
        self.shard_id = shard_id
        self.settings = load_settings()
        if self.settings.process.background_cpu:
            run_in_background()
        self.owner = f"consumer-{shard_id}"
        self._task: asyncio.Task | None = None
        self.committed_batches = 0
        self.pid = os.getpid()

    def info(self) -> dict[str, Any]:
        return {"shard_id": self.shard_id, "pid": self.pid, "batches": self.committed_batches}

    async def run(self) -> ShardEnd:
        """Consume the shard until it is finished (TERMINATE) or the lease is lost to another consumer (ZOMBIE)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return await asyncio.shield(self._task)

    async def _run(self) -> ShardEnd:
        s = self.settings
        async with Stores(s, pool=True, background=True, s3=True, kinesis=True, records=True) as stores:
            pool, s3, kinesis, records_client = stores.pool, stores.s3, stores.kinesis, stores.records
            audit = audit_handle()

            lease = None
            while lease is None:  # the previous holder's lease must expire first
                lease = await leases.take(pool, s, self.shard_id, self.owner)
                if lease is None:
                    await asyncio.sleep(min(5.0, s.process.lease_ttl_s / 3))
            if lease.finished:
                return ShardEnd.TERMINATE
            log.info("shard %s: lease epoch %d, resuming after %s", self.shard_id, lease.epoch, lease.checkpoint)
            dedup = DedupStore(s, pool, s3, s.stream.name, self.shard_id, DedupState(s.process.dedup_window_s))
            loaded = await dedup.load(await leases.ancestors(pool, s.stream.name, self.shard_id))
            log.info("shard %s: dedup state of %d ids loaded", self.shard_id, loaded)
            producer = Producer(records_client, s.stream.name, deadline_s=60.0)
            writer = BatchWriter(s, pool, s3, self.shard_id, lease, dedup=dedup,
                                 hash_range=await hash_range(kinesis, s, self.shard_id),
                                 forward=lambda events: forward(producer, self.shard_id, events))
            reader = ShardReader(s, kinesis, records_client, self.shard_id, lease.checkpoint)
            try:
                return await self._loop(pool, reader, writer, audit, lease)
            except leases.LeaseLost as exc:
                log.warning("%s; stopping (zombie shutdown)", exc)
                return ShardEnd.ZOMBIE

    async def _loop(self, pool, reader: ShardReader, writer: BatchWriter, audit, lease: leases.Lease) -> ShardEnd:
        p = self.settings.process
        pending: list[tuple[StreamRecord, list[Decoded] | None]] = []  # records read, with their events
        pending_events = 0
        pending_bytes = 0
        first_at = 0.0
        renewed = time.monotonic()
        saved = time.monotonic()
        newest_committed: datetime | None = None
        idle = p.idle_poll_s
        while True:
            records = [] if reader.closed else await reader.read()
            if records and not pending:
                first_at = time.monotonic()
            for record in records:
                try:
                    events = decode_record(record)
                except NotLapRecord:
                    events = None  # dead-lettered with its batch
                pending.append((record, events))
                pending_events += len(events or ())
                pending_bytes += len(record.data)
            due = pending and (pending_events >= p.batch_max_events or pending_bytes >= p.batch_max_bytes
                               or time.monotonic() - first_at >= p.batch_max_wait_s or reader.closed)
            if due:
                # a batch holds whole records, up to batch_max_events (one record may pass it): cut there
                taken, events = 0, []
                while taken < len(pending) and (not events or len(events) + len(pending[taken][1] or ()) <= p.batch_max_events):
                    events.extend(pending[taken][1] or ())
                    taken += 1
                batch, pending = pending[:taken], pending[taken:]
                pending_events -= len(events)
                pending_bytes = sum(len(r.data) for r, _ in pending)
                last = batch[-1][0]
                result = await self.process_batch(writer, batch, events)
                self.committed_batches += 1
                renewed = time.monotonic()
                newest = max((e.received_at for e in events), default=None)
                if newest is not None and (newest_committed is None or newest > newest_committed):
                    newest_committed = newest
                if newest_committed is not None and time.monotonic() - saved >= DEDUP_SAVE_EVERY_S:
                    saved = time.monotonic()
                    await writer.dedup_store.save_closed(newest_committed)
                    writer.dedup_store.expire(datetime.now(timezone.utc))
                if pending:
                    first_at = time.monotonic()
                # behind the tip: what Kinesis says, or the age of the newest record just committed
                # (kinesalite always says 0 for an open shard)
                age_ms = int((time.time() - (last.arrived_at or time.time())) * 1000)
                report(audit, self.shard_id, result=result, lag_ms=max(reader.lag_ms or 0, age_ms))
                continue
            if reader.closed and not pending:
                await lease.finish(pool)
                report(audit, self.shard_id, lag_ms=0)
                log.info("shard %s: closed and fully processed", self.shard_id)
                return ShardEnd.TERMINATE
            if time.monotonic() - renewed > p.lease_ttl_s / 3:
                await lease.renew(pool)
                renewed = time.monotonic()
                report(audit, self.shard_id, lag_ms=reader.lag_ms)
            if len(records) < p.get_records_limit:  # at the tip: wait a little (Kinesis allows 5 reads/s/shard)
                await asyncio.sleep(idle)
                idle = min(idle * 2, p.max_poll_s) if not records else p.idle_poll_s
            else:
                idle = p.idle_poll_s

    async def process_batch(self, writer: BatchWriter, batch: list[tuple[StreamRecord, list[Decoded] | None]],
                            events: list[Decoded]) -> BatchResult:
        """Commit a batch; if it is poison, commit its records one by one and dead-letter those that fail alone.

        A poison record would otherwise stop its shard for good: the actor's
        restarts would read and fail the same batch forever. Errors of a server
        (S3, Postgres or the stream down) are not poison: they propagate, and the
        batch is tried again from the checkpoint.
        """
        first, last = batch[0][0].sequence, batch[-1][0].sequence
        if all(record_events is not None for _, record_events in batch):
            try:
                return await writer.process_events(first, last, len(batch), events)
            except POISON as exc:
                log.error("shard %s: batch %s-%s failed (%s: %s); committing its records one by one", self.shard_id,
                          first, last, type(exc).__name__, exc)
        kept = duplicates = 0
        for record, record_events in batch:
            sequence = record.sequence
            if record_events is None:
                try:
                    decode_record(record)
                    reason = "not a LAP record"
                except NotLapRecord as exc:
                    reason = f"not a LAP record: {exc}"
                await writer.dead_letter(record, None, reason)
                continue
            try:
                result = await writer.process_events(sequence, sequence, 1, record_events)
            except POISON as exc:
                await writer.dead_letter(record, record_events, f"{type(exc).__name__}: {exc}"[:2000])
                continue
            kept += result.kept
            duplicates += result.duplicates
        return BatchResult(last, kept, duplicates)


async def hash_range(kinesis, settings: Settings, shard_id: str) -> tuple[int, int] | None:
    """The shard's hash-key range (None if the stream no longer lists it)."""
    for shard in await list_shards(kinesis, settings):
        if shard["ShardId"] == shard_id:
            r = shard["HashKeyRange"]
            return int(r["StartingHashKey"]), int(r["EndingHashKey"])
    return None


async def forward(producer: Producer, shard_id: str, events: list[Decoded]) -> None:
    """Put events back into the stream by their learner's partition key, for the shard that owns them.

    Each becomes a record of its own (this happens only for a moment after a
    reshard), marked `forwarded_from` so that the owning shard does not count a
    new acceptance for it.
    """
    records = []
    for event in events:
        meta = event.meta
        shared = {name: meta[name] for name in record_format.SHARED_FIELDS if name in meta and name != "forwarded_from"}
        shared["forwarded_from"] = {"shard": shard_id, "sequence": str(event.sequence), "position": event.position}
        own = {k: v for k, v in meta.items() if k not in record_format.SHARED_FIELDS}
        records.append(Record(record_format.encode(shared, [record_format.event_line(own, event.item)]),
                              partition_key_for(meta.get("learner") or meta["event_id"])))
    await producer.put(records)
    log.info("shard %s: %d events belong to other shards (routed by a shard map from before a reshard); "
             "put back for them", shard_id, len(events))


def audit_handle():
    try:
        return ray.get_actor(AUDIT_ACTOR, namespace=NAMESPACE)
    except ValueError:
        return None  # not running (a test drives a consumer alone): reports are skipped


@functools.cache
def _node_address() -> str:
    """The address of the node this consumer runs on: the console shows where each shard is consumed."""
    return ray.util.get_node_ip_address()


def report(audit, shard_id: str, result=None, lag_ms: int | None = None) -> None:
    """Fire-and-forget: the audit actor's view is live status, the durable truth is in Postgres."""
    if lag_ms is not None:
        metrics.consumer_lag_ms().set(lag_ms, tags={"shard": shard_id})
    if audit is None:
        return
    payload: dict[str, Any] = {"lag_ms": lag_ms, "node": _node_address()}
    if result is not None:
        payload.update(last_seq=str(result.last_seq), kept=result.kept, duplicates=result.duplicates)
    audit.consumer_report.remote(shard_id, payload)

