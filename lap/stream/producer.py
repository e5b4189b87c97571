"""Puts records into Kinesis and returns only when every one is acknowledged.

Batches respect the PutRecords limits (500 records, 5 MB per call, 1 MB per
record). Records that fail (throttling, internal errors, a failed call) are
retried with exponential backoff and full jitter until the deadline; then
`PutDeadlineExceeded` tells the caller to answer 503, so the sensor retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from lap import metrics

log = logging.getLogger("lap.producer")

MAX_RECORDS_PER_CALL = 500
MAX_BYTES_PER_CALL = 5 * 1024 * 1024
MAX_RECORD_BYTES = 1024 * 1024
MAX_PARTITION_KEY_CHARS = 256

# Errors that say the request itself is wrong: retrying cannot help.
_PERMANENT = {"ResourceNotFoundException", "ValidationException", "AccessDeniedException",
              "InvalidArgumentException", "KMSAccessDeniedException", "UnrecognizedClientException"}


@dataclass(slots=True)
class Record:
    data: bytes
    partition_key: str
    # Set: Kinesis puts the record on the shard whose range holds this hash key, not the partition key's
    explicit_hash_key: str | None = None
    size: int = field(init=False)  # what Kinesis counts against its limits; read on every batch split

    def __post_init__(self) -> None:
        self.size = len(self.data) + len(self.partition_key.encode())


@dataclass(slots=True)
class Receipt:
    shard_id: str
    sequence_number: str


class PutDeadlineExceeded(Exception):
    """Some records were still unacknowledged when the deadline passed."""

    def __init__(self, pending: int, last_error: str):
        super().__init__(f"{pending} records not acknowledged before the deadline; last error: {last_error}")
        self.pending = pending


class StreamRejected(Exception):
    """Kinesis refused the request for a reason that retrying cannot fix."""


def partition_key_for(value: str) -> str:
    """Kinesis allows 256 characters; longer ids are hashed, which keeps them on one shard all the same."""
    if len(value) <= MAX_PARTITION_KEY_CHARS and value:
        return value
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


def split_batches(records: list[Record], indexes: list[int]) -> list[list[int]]:
    """Indexes grouped into calls of at most 500 records and 5 MB."""
    batches: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in indexes:
        rsize = records[i].size
        if current and (len(current) >= MAX_RECORDS_PER_CALL or size + rsize > MAX_BYTES_PER_CALL):
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += rsize
    if current:
        batches.append(current)
    return batches


class CoalescedPuts:
    """PutRecords of concurrent requests merged into fewer, fuller calls (the KPL's buffering, kept short).

    Kinesis (and its stand-in) pays per call as well as per record. A call
    starts at once when the last one started at least `linger_s` ago; otherwise
    the records wait until then, and whatever has arrived meanwhile goes out
    together, up to 500 records and 5 MB a call, at most `max_in_flight` calls
    at a time. A quiet replica sends each request's records at once; a busy one
    waits at most `linger_s` per call. Callers see a reply (or the error) for
    their own records only.
    """

    def __init__(self, kinesis: Any, max_in_flight: int = 2, linger_s: float = 0.025):
        self.kinesis = kinesis
        self.max_in_flight = max_in_flight
        self.linger_s = linger_s
        self._queue: list[tuple[str, list[dict[str, Any]], int, asyncio.Future]] = []
        self._in_flight = 0
        self._last_start = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.calls = 0  # for tests and benchmarks: how many calls carried the puts
        self.puts = 0

    async def put_records(self, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:  # noqa: N803
        size = sum(len(r["Data"]) + len(r["PartitionKey"]) for r in Records)
        future = asyncio.get_running_loop().create_future()
        self._queue.append((StreamName, Records, size, future))
        self.puts += 1
        self._pump()
        return await future

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        self._queue = [q for q in self._queue if not q[3].done()]  # callers that gave up (their deadline) send nothing
        while self._queue and self._in_flight < self.max_in_flight:
            due = self._last_start + self.linger_s
            if loop.time() < due and sum(len(q[1]) for q in self._queue) < MAX_RECORDS_PER_CALL:
                if self._timer is None:
                    self._timer = loop.call_at(due, self._timer_fired)
                return
            stream = self._queue[0][0]
            taken, count, size = 0, 0, 0
            for name, records, nbytes, _ in self._queue:
                if taken and (name != stream or count + len(records) > MAX_RECORDS_PER_CALL
                              or size + nbytes > MAX_BYTES_PER_CALL):
                    break
                taken, count, size = taken + 1, count + len(records), size + nbytes
            waiting, self._queue = self._queue[:taken], self._queue[taken:]
            self._in_flight += 1
            self._last_start = loop.time()
            loop.create_task(self._call(stream, waiting))

    def _timer_fired(self) -> None:
        self._timer = None
        self._pump()

    async def _call(self, stream: str, waiting: list[tuple[str, list[dict[str, Any]], int, asyncio.Future]]) -> None:
        self.calls += 1
        try:
            reply = await self.kinesis.put_records(StreamName=stream, Records=[r for _, rs, _, _ in waiting for r in rs])
        except BaseException as exc:  # each caller decides: retry, or tell the sensor
            for *_, future in waiting:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            results = reply["Records"]
            start = 0
            for _, records, _, future in waiting:
                mine = results[start:start + len(records)]
                start += len(records)
                if not future.done():
                    future.set_result({"Records": mine,
                                       "FailedRecordCount": sum(1 for r in mine if r.get("ErrorCode"))})
        finally:
            self._in_flight -= 1
            self._pump()


class Producer:
    def __init__(self, kinesis: Any, stream_name: str, deadline_s: float,
                 base_backoff_s: float = 0.05, max_backoff_s: float = 1.0):
        self.kinesis = kinesis
        self.stream_name = stream_name
        self.deadline_s = deadline_s
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.retried_records = 0  # for metrics: records that needed another try

    async def put(self, records: list[Record]) -> list[Receipt]:
        """Receipts in the order of `records`. Raises PutDeadlineExceeded or StreamRejected."""
        for record in records:
            if record.size > MAX_RECORD_BYTES:
                raise ValueError(f"record of {record.size} bytes is over Kinesis's 1 MB limit")
        deadline = time.monotonic() + self.deadline_s
        receipts: list[Receipt | None] = [None] * len(records)
        pending = list(range(len(records)))
        attempt = 0
        while True:
            calls = asyncio.gather(*(self._put_call(records, batch, receipts)
                                     for batch in split_batches(records, pending)))
            try:  # a stream that hangs (frozen, or a network that drops packets) is bounded by the deadline too
                results = await asyncio.wait_for(calls, timeout=max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                raise PutDeadlineExceeded(len(pending), "the stream did not answer before the deadline") from None
            pending = [i for failed, _ in results for i in failed]
            if not pending:
                return receipts  # type: ignore[return-value]
            last_error = next((error for _, error in results if error), "")
            self.retried_records += len(pending)
            metrics.putrecords_retries().inc(len(pending))
            attempt += 1
            pause = random.uniform(0, min(self.max_backoff_s, self.base_backoff_s * 2**attempt))
            if time.monotonic() + pause >= deadline:
                raise PutDeadlineExceeded(len(pending), last_error)
            log.info("retrying %d of %d records (attempt %d): %s", len(pending), len(records), attempt, last_error)
            await asyncio.sleep(pause)

    async def _put_call(self, records: list[Record], batch: list[int],
                        receipts: list[Receipt | None]) -> tuple[list[int], str]:
        """One PutRecords call. Fills `receipts`; returns the indexes to retry and an error text."""
        entries = []
        for i in batch:
            entry = {"Data": records[i].data, "PartitionKey": records[i].partition_key}
            if records[i].explicit_hash_key is not None:
                entry["ExplicitHashKey"] = records[i].explicit_hash_key
            entries.append(entry)
        try:
            reply = await self.kinesis.put_records(StreamName=self.stream_name, Records=entries)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _PERMANENT:
                raise StreamRejected(f"Kinesis refused PutRecords: {code}: {exc}") from exc
            return batch, f"{code or type(exc).__name__}"
        except (BotoCoreError, OSError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # the stream away, or a connection it closed under the call (aiohttp's are not all OSErrors)
            return batch, f"{type(exc).__name__}: {exc}"
        failed: list[int] = []
        error = ""
        for i, result in zip(batch, reply["Records"]):
            if "SequenceNumber" in result and not result.get("ErrorCode"):
                receipts[i] = Receipt(shard_id=result["ShardId"], sequence_number=result["SequenceNumber"])
            else:
                failed.append(i)
                error = f"{result.get('ErrorCode')}: {result.get('ErrorMessage', '')}"
        return failed, error
