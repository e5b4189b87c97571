"""Which open shard owns a partition key, so that ingest can send one record per shard.

Kinesis puts a record on the shard whose hash-key range holds the MD5 of its
partition key, read as a 128-bit number. Ingest does the same sum for each
event's learner, groups the events by shard, and sends each group with an
explicit hash key inside that shard's range: a learner's events stay on one
shard, as they would one record per event.

The map goes stale when shards split or merge. A record sent with a stale map
still lands on an open shard (Kinesis routes the explicit hash key), but the
reply then names a shard the map did not expect: the producer marks the map
stale and it is listed again before the next request. It is also listed again
every `ttl_s` seconds.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import time
from typing import Any, Awaitable, Callable

log = logging.getLogger("lap.stream")


def hash_key(partition_key: str) -> int:
    return int.from_bytes(hashlib.md5(partition_key.encode()).digest(), "big")


class ShardMap:
    """The open shards of a stream, by hash-key range."""

    def __init__(self, shards: list[dict[str, Any]]):
        open_shards = sorted(
            (int(s["HashKeyRange"]["StartingHashKey"]), s["ShardId"]) for s in shards
            if "EndingSequenceNumber" not in s.get("SequenceNumberRange", {}))
        if not open_shards:
            raise ValueError("the stream has no open shard")
        self.starts = [start for start, _ in open_shards]
        self.shard_ids = [shard_id for _, shard_id in open_shards]
        # what to send as ExplicitHashKey: the first hash key of the shard's range
        self.explicit_hash_keys = [str(start) for start in self.starts]

    def __len__(self) -> int:
        return len(self.shard_ids)

    def slot(self, partition_key: str) -> int:
        """Index of the shard (in `shard_ids`) that owns this partition key."""
        return bisect.bisect_right(self.starts, hash_key(partition_key)) - 1


class ShardMapCache:
    """The current ShardMap, listed again when it is `ttl_s` old or a reply showed it stale."""

    def __init__(self, list_shards: Callable[[], Awaitable[list[dict[str, Any]]]], ttl_s: float = 60.0):
        self._list_shards = list_shards
        self.ttl_s = ttl_s
        self._map: ShardMap | None = None
        self._listed_at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> ShardMap:
        if self._map is not None and time.monotonic() - self._listed_at < self.ttl_s:
            return self._map
        async with self._lock:
            if self._map is None or time.monotonic() - self._listed_at >= self.ttl_s:
                self._map = ShardMap(await self._list_shards())
                self._listed_at = time.monotonic()
                log.info("shard map: %d open shards", len(self._map))
        return self._map

    def stale(self) -> None:
        """A reply named a shard the map did not expect (a split or merge): list the shards again."""
        self._listed_at = 0.0
