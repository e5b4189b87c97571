"""LAP's stream record: the events of one request that belong to one shard, compressed into one record.

Kinesis (and its stand-in) charges per record and per byte, so a record that
holds many compressed events costs a fraction of one record per event. The
format is specified in docs/stream-records.md, so that a consumer written
elsewhere can read it; in short:

    b"LAP" 0x01 | zlib( header line "\\n" event line "\\n" event line ... )

The header holds what every event of the request shares (tenant, sensor,
received time, request id...). Each event line is `{"meta": {...}, "item": {...}}`
with the event's own metadata; an event's position is its index among the
event lines. The first records (format 0, one event per record) are
a bare `{"meta", "item"}` JSON object, and are still read (position 0).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

MAGIC = b"LAP"
FORMAT_VERSION = 1
PREFIX = MAGIC + bytes([FORMAT_VERSION])
# zlib level 1: as small as level 3 within ~8% on Caliper events, and the cheapest to make
ZLIB_LEVEL = 1

@dataclass(slots=True, frozen=True)
class StreamRecord:
    """One record as read back from a shard: where it sits, its bytes, and when it reached the stream.

    GetRecords' dicts become these as soon as they are read, so the consumer,
    the batch writer and replay (which reads records again from the stream or
    from a dead letter) share one type.
    """

    sequence: int
    data: bytes
    arrived_at: float | None = None  # seconds since the epoch, as Kinesis reports it; None when not known

    @classmethod
    def from_get_records(cls, record: dict[str, Any]) -> "StreamRecord":
        arrival = record.get("ApproximateArrivalTimestamp")
        if isinstance(arrival, datetime):  # botocore parses it; LAP's own records client leaves the number
            arrival = arrival.timestamp()
        return cls(int(record["SequenceNumber"]), bytes(record["Data"]),
                   float(arrival) if arrival is not None else None)


# What the header carries for every event of the record (docs/stream-records.md).
SHARED_FIELDS = ("tenant", "sensor", "key_id", "received_at", "request_id", "data_version",
                 # set only on a record a shard consumer put back for another shard (lap/process/batch.py)
                 "forwarded_from")
# A record holds the events of one request body (limits.max_body_bytes, 4 MB by default) plus their
# metadata; anything that inflates past this is not LAP's, and must not take the consumer's memory.
MAX_INFLATED_BYTES = 64 * 1024 * 1024


class NotLapRecord(ValueError):
    """The record's data is not in a format LAP knows (corrupt, foreign, or a newer format version)."""


def encode(shared: dict[str, Any], lines: list[bytes]) -> bytes:
    """One record of format 1 from the shared metadata and already serialised event lines."""
    header = orjson.dumps({"format": FORMAT_VERSION, "events": len(lines), **shared})
    body = header + b"\n" + b"\n".join(lines) if lines else header  # none: an erasure emptied a kept record
    return PREFIX + zlib.compress(body, ZLIB_LEVEL)


def event_line(meta: dict[str, Any], item: dict[str, Any]) -> bytes:
    return orjson.dumps({"meta": meta, "item": item})


def decode(data: bytes) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The (meta, item) pairs of a record, in position order; each meta is complete (shared fields merged in)."""
    return [(meta, item) for meta, item, _ in decode_lines(data)]


_META, _ITEM = b'{"meta":', b',"item":'


def line_meta(line: bytes) -> dict[str, Any] | None:
    """The meta of a line `{"meta": {...}, "item": {...}}` LAP wrote, without parsing the item (None if the
    layout is another's); see _raw_item for why the first `,"item":` is the end of the meta."""
    at = line.find(_ITEM)
    return orjson.loads(line[len(_META):at]) if at > 0 and line.startswith(_META) else None


def _raw_item(line: bytes) -> bytes | None:
    """The item's JSON as it is in a line `{"meta": {...}, "item": {...}}` LAP wrote (meta first): no key in
    meta is "item", and a quote inside a JSON string is escaped, so the first `,"item":` is the one."""
    at = line.find(_ITEM)
    return line[at + len(_ITEM):-1] if at > 0 and line.endswith(b"}") else None


def decode_lines(data: bytes) -> list[tuple[dict[str, Any], dict[str, Any], bytes | None]]:
    """As `decode`, with each item's JSON bytes as the record holds them (None if the layout is another's)."""
    if data[:1] == b"{":  # format 0: one event
        try:
            doc = orjson.loads(data)
            return [(doc["meta"], doc["item"], _raw_item(data))]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise NotLapRecord(f"not a LAP event record: {exc}") from None
    if data[:3] != MAGIC:
        raise NotLapRecord("the record does not start with LAP's magic bytes")
    if data[3:4] != bytes([FORMAT_VERSION]):
        version = data[3] if len(data) > 3 else None
        raise NotLapRecord(f"stream record format {version} is not known to this release (it reads 0 and 1)")
    try:
        inflater = zlib.decompressobj()
        payload = inflater.decompress(data[4:], MAX_INFLATED_BYTES)
        if inflater.unconsumed_tail or not inflater.eof:
            raise NotLapRecord("a format 1 record that is truncated or inflates past 64 MB")
        lines = payload.split(b"\n")
        header = orjson.loads(lines[0])
        shared = {name: header[name] for name in SHARED_FIELDS if name in header}
        events = []
        for line in lines[1:]:
            doc = orjson.loads(line)
            meta = doc["meta"]
            meta.update(shared)
            events.append((meta, doc["item"], _raw_item(line)))
    except (zlib.error, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise NotLapRecord(f"a format 1 record that cannot be read: {exc}") from None
    if header.get("events") != len(events):
        raise NotLapRecord(f"the header says {header.get('events')} events, the record holds {len(events)}")
    return events
