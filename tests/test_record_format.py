"""The stream record format (docs/stream-records.md), the shard map, and how ingest packs an envelope."""

from __future__ import annotations

import os
import uuid
import zlib
from contextlib import AsyncExitStack
from datetime import datetime, timezone

import orjson
import pytest

from lap.auth import Principal
from lap.aws import open_client
from lap.caliper import parse_envelope
from lap.ingest.records import RecordTooLarge, pack
from lap.process.batch import decode, decode_record
from lap.samples import EventFactory, envelope
from lap.stream import record_format
from lap.stream.producer import partition_key_for
from lap.stream.record_format import NotLapRecord, StreamRecord
from lap.stream.shard_map import ShardMap, hash_key

SHARED = {"tenant": "acme", "sensor": "https://lms.example.edu/sensors/lms", "key_id": "k1",
          "received_at": "2026-11-30T10:00:00.123456Z", "request_id": "r1",
          "data_version": "http://purl.imsglobal.org/ctx/caliper/v1p2"}
PRINCIPAL = Principal(key_id="k1", tenant="acme", role="sensor", sensor=None, rate_per_s=None)


def four_shards() -> list[dict]:
    """Four shards splitting the hash space evenly, as Kinesis creates them, plus one closed parent."""
    top = 2**128
    shards = [{"ShardId": f"shardId-00000000000{i}",
               "HashKeyRange": {"StartingHashKey": str(i * top // 4), "EndingHashKey": str((i + 1) * top // 4 - 1)},
               "SequenceNumberRange": {"StartingSequenceNumber": "1"}} for i in range(4)]
    shards.append({"ShardId": "shardId-closed", "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": str(top - 1)},
                   "SequenceNumberRange": {"StartingSequenceNumber": "0", "EndingSequenceNumber": "1"}})
    return shards


def test_a_record_holds_events_in_position_order_with_the_shared_metadata():
    lines = [record_format.event_line({"event_id": f"e{i}", "kind": "event"}, {"id": f"e{i}", "n": i})
             for i in range(5)]
    data = record_format.encode(SHARED, lines)
    assert data[:4] == b"LAP\x01"
    header, *events = zlib.decompress(data[4:]).split(b"\n")  # the layout a foreign reader relies on
    assert orjson.loads(header) == {"format": 1, "events": 5, **SHARED}
    assert [orjson.loads(e)["item"]["n"] for e in events] == [0, 1, 2, 3, 4]
    decoded = record_format.decode(data)
    assert [item["id"] for _, item in decoded] == ["e0", "e1", "e2", "e3", "e4"]
    assert all(meta["tenant"] == "acme" and meta["request_id"] == "r1" for meta, _ in decoded)


def test_one_event_records_of_format_0_are_still_read():
    old = orjson.dumps({"meta": {"event_id": "e0", **SHARED}, "item": {"id": "e0"}})
    events = decode_record(StreamRecord(42, old))
    assert [(e.sequence, e.position, e.meta["event_id"]) for e in events] == [(42, 0, "e0")]
    assert events[0].received_at == datetime(2026, 11, 30, 10, 0, 0, 123456, tzinfo=timezone.utc)


@pytest.mark.parametrize("data, reason", [
    (b"\x00\x01binary", "magic"),
    (b"LAP\x02" + zlib.compress(b"{}"), "format 2"),
    (b"LAP\x01" + zlib.compress(b"{}")[:-3], "truncated"),
    (b"LAP\x01not zlib", "cannot be read"),
    (b"LAP\x01" + zlib.compress(b'{"format":1,"events":3}\n{"meta":{},"item":{}}'), "header says 3"),
    (b"LAP\x01" + zlib.compress(b"x" * (65 * 1024 * 1024), 9), "64 MB"),
    (b'{"meta": 1}', "not a LAP event record"),
])
def test_records_that_are_not_lap_s_are_refused_clearly(data, reason):
    with pytest.raises(NotLapRecord, match=reason):
        record_format.decode(data)
    assert decode([StreamRecord(7, data)]) == ([], 1)  # a reader of many records skips it and counts it
    with pytest.raises(NotLapRecord, match=reason):  # the consumer's own decoder: it dead-letters the record
        decode_record(StreamRecord(7, data))


def test_the_shard_map_follows_kinesis_md5_rule_and_ignores_closed_shards():
    shards = ShardMap(four_shards())
    assert len(shards) == 4
    for n in range(200):
        key = f"https://lms.example.edu/users/{n}"
        assert shards.slot(key) == hash_key(key) * 4 // 2**128
    assert shards.explicit_hash_keys[0] == "0"


async def test_the_shard_map_agrees_with_the_stream_stand_in(settings):
    """A record put by partition key alone lands on the shard the map names for that key."""
    async with AsyncExitStack() as stack:
        kinesis = await open_client(stack, settings, "kinesis")
        shards = ShardMap((await kinesis.list_shards(StreamName=settings.stream.name))["Shards"])
        keys = [f"map-check-{uuid.uuid4().hex}" for _ in range(40)]
        reply = await kinesis.put_records(StreamName=settings.stream.name,
                                          Records=[{"Data": b"not-an-event", "PartitionKey": k} for k in keys])
        assert reply["FailedRecordCount"] == 0
        assert [r["ShardId"] for r in reply["Records"]] == [shards.shard_ids[shards.slot(k)] for k in keys]
        assert len({r["ShardId"] for r in reply["Records"]}) > 1


def _envelope(n: int, seed: int = 3):
    return parse_envelope(orjson.dumps(envelope(EventFactory(seed=seed, learners=50).events(n))))


def test_pack_makes_one_record_per_shard_and_keeps_each_learner_on_its_shard():
    env = _envelope(200)
    shards = ShardMap(four_shards())
    packed = pack(env, PRINCIPAL, datetime.now(timezone.utc), "req", shards, 1024 * 1024)
    assert len(packed.records) == len({shards.slot(partition_key_for(i.learner or i.id)) for i in env.items}) <= 4
    assert sorted(i for m in packed.members for i in m) == list(range(200))
    for record, members, shard_id in zip(packed.records, packed.members, packed.shard_ids):
        slot = shards.shard_ids.index(shard_id)
        assert record.explicit_hash_key == shards.explicit_hash_keys[slot]
        assert {shards.slot(partition_key_for(env.items[i].learner)) for i in members} == {slot}
        decoded = record_format.decode(record.data)
        assert [m["event_id"] for m, _ in decoded] == [env.items[i].id for i in members]  # position order
        assert [item for _, item in decoded] == [env.items[i].doc for i in members]
    total = sum(r.size for r in packed.records)
    raw = sum(len(orjson.dumps(i.doc)) for i in env.items)
    assert total < raw / 4  # compressed: far smaller than the events themselves


def test_pack_splits_a_group_over_the_record_limit_and_refuses_an_item_that_cannot_fit():
    env = _envelope(60)
    one_shard = ShardMap([{"ShardId": "s0", "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": str(2**128 - 1)},
                           "SequenceNumberRange": {"StartingSequenceNumber": "1"}}])
    whole = pack(env, PRINCIPAL, datetime.now(timezone.utc), "req", one_shard, 1024 * 1024)
    assert len(whole.records) == 1
    limit = whole.records[0].size // 3
    split = pack(env, PRINCIPAL, datetime.now(timezone.utc), "req", one_shard, limit)
    assert len(split.records) >= 3 and all(r.size <= limit for r in split.records)
    assert [i for m in split.members for i in m] == list(range(60))  # order kept across the pieces

    env.items[7].doc["extensions"] = {"noise": os.urandom(8 * 1024).hex()}  # incompressible
    with pytest.raises(RecordTooLarge) as refused:
        pack(env, PRINCIPAL, datetime.now(timezone.utc), "req", one_shard, 8 * 1024)
    assert [p.index for p in refused.value.problems] == [7]
    assert "compressed stream record" in refused.value.problems[0].message


def test_archive_lines_keep_the_items_bytes_as_the_stream_held_them():
    """The archive line made from the record's own item bytes is the line made by serialising the item again."""
    from dataclasses import replace

    from lap.process.batch import archive_line

    env = _envelope(40, seed=9)
    packed = pack(env, PRINCIPAL, datetime.now(timezone.utc), "req", ShardMap(four_shards()), 1024 * 1024)
    for n, record in enumerate(packed.records):
        for event in decode_record(StreamRecord(100 + n, record.data)):
            assert event.raw_item is not None
            assert archive_line(event, "s") == archive_line(replace(event, raw_item=None), "s")
