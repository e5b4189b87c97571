"""Receipts of accepted events, written to Postgres in batches, off the request path.

The sensor's answer waits only for Kinesis. Receipts are buffered in the
replica and copied into `receipts` every half second. If a replica dies
before a flush, its last receipts are lost from this table only: the records
themselves, with the same metadata, are in the stream.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from decimal import Decimal

import asyncpg

log = logging.getLogger("lap.receipts")

COLUMNS = ("event_id", "tenant", "sensor", "shard_id", "sequence_number", "position", "received_at", "request_id",
           "kind")
ADD_ACCEPTED = """
INSERT INTO stage_counts (tenant, sensor, shard_id, received_minute, stage, events)
VALUES ($1, $2, $3, $4, 'accepted', $5)
ON CONFLICT (tenant, received_minute, sensor, shard_id, stage)
DO UPDATE SET events = stage_counts.events + excluded.events
"""


def accepted_counts(rows: list[tuple]) -> list[tuple]:
    """The receipts counted per tenant, sensor, shard and minute: the `accepted` stage of the audit."""
    counts: dict[tuple, int] = {}
    for _, tenant, sensor, shard_id, _, _, received_at, _, _ in rows:
        key = (tenant, sensor, shard_id, received_at.replace(second=0, microsecond=0))  # received_at is UTC
        counts[key] = counts.get(key, 0) + 1
    return sorted((*key, n) for key, n in counts.items())  # in key order: replicas never deadlock


class ReceiptWriter:
    def __init__(self, pool: asyncpg.Pool, flush_interval_s: float = 0.5, max_buffered: int = 500_000):
        self.pool = pool
        self.flush_interval_s = flush_interval_s
        self.max_buffered = max_buffered
        self._rows: list[tuple] = []
        self._task: asyncio.Task | None = None
        self.dropped = 0

    def add_record(self, tenant: str, sensor: str, received_at: datetime, request_id: str, shard_id: str,
                   sequence_number: str, events: list[tuple[str, str]]) -> None:
        """The receipts of one stream record: `events` are (event id, kind) in position order."""
        if len(self._rows) >= self.max_buffered:  # Postgres has been away for long: keep memory bounded
            self.dropped += len(events)
            return
        seq = Decimal(sequence_number)
        self._rows.extend((event_id, tenant, sensor, shard_id, seq, position, received_at, request_id, kind)
                          for position, (event_id, kind) in enumerate(events))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
            except Exception as exc:  # kept in the buffer; tried again at the next tick
                log.warning("receipts flush failed (%d buffered): %s", len(self._rows), exc)

    async def flush(self) -> int:
        if not self._rows:
            return 0
        rows, self._rows = self._rows, []
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.copy_records_to_table("receipts", records=rows, columns=COLUMNS)
                await conn.executemany(ADD_ACCEPTED, accepted_counts(rows))
        except BaseException:
            self._rows = rows + self._rows
            raise
        return len(rows)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.flush()
