"""The Kinesis producer against the real stand-in, with faults injected on the network path."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import AsyncExitStack

import pytest

from lap.aws import open_client
from lap.stream.producer import (
    MAX_BYTES_PER_CALL,
    Producer,
    PutDeadlineExceeded,
    Record,
    partition_key_for,
    split_batches,
)
from lap.stream.records_client import RecordsClient
from tests.support.faults import KinesisFaultProxy


def test_batches_respect_the_record_and_byte_limits():
    small = [Record(b"x" * 100, f"k{i}") for i in range(1201)]
    batches = split_batches(small, list(range(len(small))))
    assert [len(b) for b in batches] == [500, 500, 201]
    big = [Record(b"x" * (900 * 1024), f"k{i}") for i in range(12)]
    batches = split_batches(big, list(range(len(big))))
    assert all(sum(big[i].size for i in b) <= MAX_BYTES_PER_CALL for b in batches)
    assert [len(b) for b in batches] == [5, 5, 2]
    assert sorted(i for b in batches for i in b) == list(range(12))


def test_long_partition_keys_are_hashed_stably():
    long_id = "https://lms.example.edu/users/" + "x" * 400
    key = partition_key_for(long_id)
    assert len(key) <= 256 and key == partition_key_for(long_id) and key != partition_key_for(long_id + "y")
    assert partition_key_for("https://lms.example.edu/users/1") == "https://lms.example.edu/users/1"


@pytest.fixture
async def proxied(settings):
    """A producer whose Kinesis traffic goes through the fault proxy; yields (producer, proxy, direct client)."""
    proxy = KinesisFaultProxy(settings.stream.endpoint_url)
    url = await proxy.start()
    proxied_settings = settings.model_copy(update={"stream": settings.stream.model_copy(update={"endpoint_url": url})})
    via_proxy = RecordsClient(proxied_settings)  # the client the ingest API uses
    async with AsyncExitStack() as stack:
        direct = await open_client(stack, settings, "kinesis")
        producer = Producer(via_proxy, settings.stream.name, deadline_s=5.0, base_backoff_s=0.01, max_backoff_s=0.1)
        yield producer, proxy, direct
    await via_proxy.close()
    await proxy.close()


async def _stream_data_at(kinesis, stream: str, shard: str, seq: str) -> bytes:
    it = await kinesis.get_shard_iterator(StreamName=stream, ShardId=shard, ShardIteratorType="AT_SEQUENCE_NUMBER",
                                          StartingSequenceNumber=seq)
    reply = await kinesis.get_records(ShardIterator=it["ShardIterator"], Limit=1)
    return reply["Records"][0]["Data"]


async def _count_in_stream(kinesis, stream: str, marker: bytes) -> int:
    """Records whose data carries `marker`, over every shard from the oldest record."""
    count = 0
    shards = (await kinesis.list_shards(StreamName=stream))["Shards"]
    for shard in shards:
        it = (await kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                               ShardIteratorType="TRIM_HORIZON"))["ShardIterator"]
        while it:
            reply = await kinesis.get_records(ShardIterator=it, Limit=10000)
            count += sum(marker in r["Data"] for r in reply["Records"])
            if not reply["Records"] or reply.get("MillisBehindLatest", 0) == 0:
                break
            it = reply.get("NextShardIterator")
    return count


async def test_partial_failures_are_retried_until_every_record_is_acknowledged(proxied, settings):
    producer, proxy, direct = proxied
    marker = uuid.uuid4().hex.encode()
    records = [Record(marker + b":" + str(i).encode(), f"learner-{i % 37}") for i in range(1200)]
    # The first three calls lose every third record; later calls succeed.
    proxy.fail_record = lambda call, pos: call <= 3 and pos % 3 == 0
    receipts = await producer.put(records)

    assert proxy.put_calls > 3  # the failed records were sent again
    # Calls 1-3 were the batches of 500, 500 and 200: every third record of each failed once.
    assert producer.retried_records == sum(len(range(0, size, 3)) for size in (500, 500, 200))
    assert len(receipts) == len(records) and all(r is not None for r in receipts)
    for i in (0, 1, 3, 599, 1199):  # each receipt points at its own record
        data = await _stream_data_at(direct, settings.stream.name, receipts[i].shard_id, receipts[i].sequence_number)
        assert data == records[i].data
    assert await _count_in_stream(direct, settings.stream.name, marker) == len(records)  # no loss, no duplicate


async def test_a_failed_call_is_retried(proxied):
    producer, proxy, _ = proxied
    proxy.fail_call = lambda call: call == 1
    receipts = await producer.put([Record(b"whole-call-" + uuid.uuid4().hex.encode(), "k")])
    assert len(receipts) == 1 and receipts[0].sequence_number


async def test_a_missing_stream_is_a_permanent_error(settings):
    from lap.stream.producer import StreamRejected

    client = RecordsClient(settings)
    try:
        producer = Producer(client, "no-such-stream", deadline_s=5.0)
        with pytest.raises(StreamRejected, match="ResourceNotFoundException"):
            await producer.put([Record(b"x", "k")])
    finally:
        await client.close()


async def test_deadline_passes_when_the_stream_keeps_refusing(proxied):
    producer, proxy, _ = proxied
    producer.deadline_s = 1.0
    proxy.fail_record = lambda call, pos: pos == 0  # the first record of every call fails, forever
    started = time.monotonic()
    with pytest.raises(PutDeadlineExceeded) as caught:
        await producer.put([Record(b"never-" + uuid.uuid4().hex.encode(), "k"), Record(b"fine", "j")])
    assert caught.value.pending == 1
    assert time.monotonic() - started < 2.0


async def test_concurrent_puts_share_calls_and_each_gets_its_own_receipts(proxied, settings):
    """Requests that arrive while a call is due share the next PutRecords call (CoalescedPuts)."""
    from lap.stream.producer import CoalescedPuts

    producer, proxy, direct = proxied
    coalesced = CoalescedPuts(producer.kinesis, max_in_flight=1, linger_s=0.05)
    producer.kinesis = coalesced
    marker = uuid.uuid4().hex.encode()
    requests = [[Record(marker + f":{r}:{i}".encode(), f"learner-{r}-{i}") for i in range(4)] for r in range(40)]
    started = time.monotonic()
    receipts = await asyncio.gather(*(producer.put(records) for records in requests))
    assert time.monotonic() - started < 2.0
    assert coalesced.puts == 40 and coalesced.calls <= 3, (coalesced.calls, proxy.put_calls)
    for records, got in zip(requests[::9], receipts[::9]):  # each caller's receipts point at its own records
        for record, receipt in zip(records, got):
            assert await _stream_data_at(direct, settings.stream.name, receipt.shard_id,
                                         receipt.sequence_number) == record.data
    assert await _count_in_stream(direct, settings.stream.name, marker) == 160

    # a lone put on a quiet producer goes out at once, not after the linger
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await producer.put([Record(marker + b":alone", "k")])
    assert time.monotonic() - started < 0.05


async def test_a_failed_shared_call_is_retried_by_each_caller(proxied):
    from lap.stream.producer import CoalescedPuts

    producer, proxy, _ = proxied
    producer.kinesis = CoalescedPuts(producer.kinesis, max_in_flight=1, linger_s=0.05)
    proxy.fail_call = lambda call: call == 1  # the shared call fails as a whole
    results = await asyncio.gather(*(producer.put([Record(uuid.uuid4().hex.encode(), f"k{i}")]) for i in range(10)))
    assert all(len(r) == 1 and r[0].sequence_number for r in results)
    assert proxy.put_calls >= 2
