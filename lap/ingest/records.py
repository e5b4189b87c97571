"""What the ingest replica does per event, in one place: from a valid envelope to the stream records.

Per event: its metadata and one JSON line, and the shard of its learner.
Per shard the request touches: one compressed record (lap/stream/record_format.py)
with an explicit hash key inside that shard's range. Everything else a request
costs (auth, the body, validation, PutRecords, receipts) is per request or per
record, not per event; validation itself is in lap/caliper/parser.py.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from datetime import datetime

import orjson

from lap.auth import Principal
from lap.caliper import Envelope, ItemProblem
from lap.stream import record_format
from lap.stream.producer import Record, partition_key_for
from lap.stream.shard_map import ShardMap, hash_key


class RecordTooLarge(Exception):
    """Some items cannot fit in a stream record, even alone."""

    def __init__(self, problems: list[ItemProblem]):
        super().__init__(f"{len(problems)} items are over the stream's record size limit")
        self.problems = problems


class ItemsTooDeep(Exception):
    """Some items nest deeper than a stream record's JSON can hold (orjson writes 254 levels at most)."""

    def __init__(self, problems: list[ItemProblem]):
        super().__init__(f"{len(problems)} items nest too deep")
        self.problems = problems


MAX_ITEM_DEPTH = 250  # what orjson can write of an item inside its {"meta", "item"} line, rounded down


@dataclass(slots=True)
class Packed:
    """The stream records of one envelope; `members[r]` are the item indexes of record r, in position order."""

    records: list[Record]
    members: list[list[int]]
    shard_ids: list[str]  # the shard each record is meant for, by the shard map used


def utc_text(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def pack(envelope: Envelope, principal: Principal, received_at: datetime, request_id: str, shards: ShardMap,
         max_record_bytes: int) -> Packed:
    shared = {
        "tenant": principal.tenant, "sensor": envelope.sensor, "key_id": principal.key_id,
        "received_at": utc_text(received_at), "request_id": request_id, "data_version": envelope.data_version,
    }
    lines: list[bytes] = []
    keys: list[str] = []
    by_slot: dict[int, list[int]] = {}
    starts = shards.starts
    dumps = orjson.dumps
    too_deep: list[ItemProblem] = []
    for n, item in enumerate(envelope.items):
        event_time = item.event_time
        meta = {
            "event_id": item.id, "kind": item.kind, "type": item.type, "action": item.action,
            "learner": item.learner, "course": item.course,
            "event_time": event_time.isoformat().replace("+00:00", "Z") if event_time is not None else None,
        }
        try:
            lines.append(dumps({"meta": meta, "item": item.doc}))  # record_format.event_line, inlined: per event
        except orjson.JSONEncodeError:  # parsing takes 1,024 levels, writing fewer: refused, never retried
            too_deep.append(ItemProblem(item.index, f"$.data[{item.index}]",
                                    f"this item nests objects or arrays more than {MAX_ITEM_DEPTH} levels deep"))
            lines.append(b"")
        key = partition_key_for(item.learner or item.id)
        keys.append(key)
        slot = bisect_right(starts, hash_key(key)) - 1  # ShardMap.slot, inlined
        group = by_slot.get(slot)
        if group is None:
            by_slot[slot] = [n]
        else:
            group.append(n)

    if too_deep:
        raise ItemsTooDeep(too_deep)
    packed = Packed([], [], [])
    too_big: list[ItemProblem] = []

    def add(slot: int, members: list[int]) -> None:
        record = Record(record_format.encode(shared, [lines[i] for i in members]), keys[members[0]],
                        shards.explicit_hash_keys[slot])
        if record.size <= max_record_bytes:
            packed.records.append(record)
            packed.members.append(members)
            packed.shard_ids.append(shards.shard_ids[slot])
        elif len(members) == 1:
            index = envelope.items[members[0]].index
            too_big.append(ItemProblem(index, f"$.data[{index}]",
                                   f"this item makes a compressed stream record of {record.size} bytes; "
                                   f"the limit is {max_record_bytes} bytes"))
        else:  # rare: over 1 MB compressed; halves keep the learners' events in order
            half = len(members) // 2
            add(slot, members[:half])
            add(slot, members[half:])

    for slot, members in by_slot.items():
        add(slot, members)
    if too_big:
        raise RecordTooLarge(sorted(too_big, key=lambda p: p.index))
    return packed
