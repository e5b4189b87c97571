"""The Kinesis stream: create it, wait for it, describe its shards."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from lap.settings import Settings


class StreamError(RuntimeError):
    pass


async def ensure_stream(kinesis: Any, settings: Settings, timeout: float = 60.0) -> None:
    """Create the stream with `stream.shards` shards and `retention.stream_hours` if it is missing, and wait until
    it is ACTIVE. An existing stream is left as it is (`lap preflight` says if its retention differs)."""
    name = settings.stream.name
    created = False
    try:
        await describe_stream(kinesis, settings)  # exists: its shard count is left as it is
    except kinesis.exceptions.ResourceNotFoundException:
        try:
            await kinesis.create_stream(StreamName=name, ShardCount=settings.stream.shards)
            created = True
        except kinesis.exceptions.ResourceInUseException:
            pass  # created meanwhile by another start
    deadline = time.monotonic() + timeout
    while True:
        summary = await describe_stream(kinesis, settings)
        if summary["StreamStatus"] == "ACTIVE":
            hours = settings.retention.stream_hours
            if created and summary.get("RetentionPeriodHours", 24) < hours:
                await kinesis.increase_stream_retention_period(StreamName=name, RetentionPeriodHours=hours)
                created = False
                continue  # UPDATING for a moment
            return
        if time.monotonic() > deadline:
            raise StreamError(f"stream {name} is still {summary['StreamStatus']} after {timeout:.0f} s")
        await asyncio.sleep(0.2)


async def describe_stream(kinesis: Any, settings: Settings) -> dict[str, Any]:
    reply = await kinesis.describe_stream_summary(StreamName=settings.stream.name)
    return reply["StreamDescriptionSummary"]


async def list_shards(kinesis: Any, settings: Settings) -> list[dict[str, Any]]:
    """Every shard of the stream, open and closed, following pagination."""
    shards: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"StreamName": settings.stream.name}
    while True:
        reply = await kinesis.list_shards(**kwargs)
        shards.extend(reply["Shards"])
        token = reply.get("NextToken")
        if not token:
            return shards
        kwargs = {"NextToken": token}


async def oldest_arrival(settings: Settings, shard_id: str):
    """When the oldest record a shard still holds reached the stream (None: it holds none, or is gone)."""
    record = await _oldest_record(settings, shard_id)
    if record is None:
        return None
    arrival = record["ApproximateArrivalTimestamp"]
    if isinstance(arrival, (int, float)):
        from datetime import datetime, timezone

        arrival = datetime.fromtimestamp(arrival, timezone.utc)
    return arrival


async def oldest_sequence(settings: Settings, shard_id: str) -> int | None:
    """The sequence number of the oldest record a shard still holds (None: it holds none, or is gone)."""
    record = await _oldest_record(settings, shard_id)
    return int(record["SequenceNumber"]) if record is not None else None


async def _oldest_record(settings: Settings, shard_id: str) -> dict[str, Any] | None:
    from contextlib import AsyncExitStack

    from lap.aws import open_client

    async with AsyncExitStack() as stack:
        kinesis = await open_client(stack, settings, "kinesis")
        try:
            iterator = (await kinesis.get_shard_iterator(
                StreamName=settings.stream.name, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"))["ShardIterator"]
        except kinesis.exceptions.ResourceNotFoundException:
            return None
        for _ in range(100):  # a trimmed shard can answer a few empty pages first
            reply = await kinesis.get_records(ShardIterator=iterator, Limit=1)
            if reply["Records"]:
                return reply["Records"][0]
            iterator = reply.get("NextShardIterator")
            if not iterator or reply.get("MillisBehindLatest", 0) == 0:
                return None
    return None
