"""Keeps what LAP refused: the payload (up to a cap) and the reasons in S3, counters in Postgres.

Operators see what each sensor sends wrong (`quarantine/v1/tenant=T/date=D/hour=H/...`).
Writing happens in the background: a refused request is answered at once,
and no quarantine write can delay or disturb accepted events.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from lap.sinks.archive import learner_hash32

log = logging.getLogger("lap.quarantine")

MAX_NAMED = 4096  # a payload naming more IRIs than this is read whole by an erasure instead


def strings_in(doc: Any) -> Iterator[str]:
    """Every string of a parsed JSON document, keys too."""
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def named_hashes(payload: bytes) -> list[int] | None:
    """The 32-bit hashes of every string of the payload that could be an IRI (it holds a ':'), for an erasure to
    find the refusals that may name a learner; None when the payload is not whole JSON or names too many."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    named: set[str] = set()
    for value in strings_in(doc):
        if ":" in value:
            named.add(value)
            if len(named) > MAX_NAMED:
                return None
    return sorted({learner_hash32(iri) for iri in named})


class Quarantine:
    def __init__(self, s3: Any, pool: asyncpg.Pool, bucket: str, prefix: str, payload_cap: int,
                 max_pending: int = 256):
        self.s3 = s3
        self.pool = pool
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.payload_cap = payload_cap
        self.max_pending = max_pending
        self._pending: set[asyncio.Task] = set()
        self.dropped = 0

    @staticmethod
    def object_key(prefix: str, tenant: str, received_at: datetime, request_id: str) -> str:
        return (f"{prefix}/tenant={tenant}/date={received_at:%Y-%m-%d}/hour={received_at:%H}/"
                f"{received_at:%Y%m%dT%H%M%S}-{request_id}.json")

    def submit(self, *, tenant: str, sensor: str, key_id: str, request_id: str, received_at: datetime,
               status: int, title: str, problems: list[dict], body: bytes, headers: dict[str, str]) -> None:
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            log.warning("quarantine backlog full: not keeping request %s (%d dropped so far)", request_id, self.dropped)
            return
        task = asyncio.get_running_loop().create_task(self._write(
            tenant, sensor, key_id, request_id, received_at, status, title, problems, body, headers))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, tenant: str, sensor: str, key_id: str, request_id: str, received_at: datetime,
                     status: int, title: str, problems: list[dict], body: bytes, headers: dict[str, str]) -> None:
        kept = body[: self.payload_cap]
        learners = named_hashes(kept) if len(kept) == len(body) else None
        try:
            payload, encoding = kept.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(kept).decode(), "base64"
        document = {
            "request_id": request_id, "tenant": tenant, "sensor": sensor, "key_id": key_id,
            "received_at": received_at.isoformat(), "status": status, "title": title, "problems": problems,
            "headers": headers, "payload_bytes": len(body), "payload_truncated": len(kept) < len(body),
            "payload_encoding": encoding, "payload": payload,
        }
        key = self.object_key(self.prefix, tenant, received_at, request_id)
        try:
            await self.s3.put_object(Bucket=self.bucket, Key=key, Body=orjson.dumps(document),
                                     ContentType="application/json")
        except Exception as exc:
            log.error("quarantine: could not store %s: %s", key, exc)
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    """INSERT INTO quarantined (request_id, tenant, sensor, received_at, status, title, problems,
                                                payload_bytes, object_key, learners)
                       VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10) ON CONFLICT (request_id) DO NOTHING""",
                    request_id, tenant, sensor, received_at, status, title, orjson.dumps(problems).decode(),
                    len(body), key, learners)
                await conn.execute(
                    """INSERT INTO quarantine_counts (tenant, sensor, day, status, count, bytes)
                       VALUES ($1, $2, $3, $4, 1, $5)
                       ON CONFLICT (tenant, sensor, day, status)
                       DO UPDATE SET count = quarantine_counts.count + 1, bytes = quarantine_counts.bytes + $5""",
                    tenant, sensor, received_at.date(), status, len(body))
        except Exception as exc:
            log.error("quarantine: could not count request %s: %s", request_id, exc)

    async def close(self, timeout: float = 10.0) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=timeout)
