"""Per-key request rate limits: a token bucket for each key, in each replica.

A bucket holds one second of requests, so a key may burst to its rate and
then sustain it. The limit is per replica: with N ingest replicas a key can
reach N times its rate at most.
"""

from __future__ import annotations

import math
import time


class RateLimiter:
    def __init__(self, default_rate: float, max_keys: int = 100_000):
        self.default_rate = default_rate
        self.max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}  # key id -> [tokens, last refill time]

    def wait_seconds(self, key_id: str, rate: float | None = None) -> float:
        """0 when the request may go ahead (and takes a token), else seconds until one is free."""
        rate = rate or self.default_rate
        capacity = max(rate, 1.0)
        now = time.monotonic()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.clear()  # an unbounded number of keys must not grow memory without end
            bucket = self._buckets[key_id] = [capacity, now]
        tokens = min(capacity, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / rate


def retry_after(seconds: float) -> str:
    """Retry-After takes whole seconds."""
    return str(max(1, math.ceil(seconds)))
