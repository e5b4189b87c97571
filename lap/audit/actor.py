"""AuditActor: the live per-shard view of the pipeline (lag, last sequence per stage, counts).

Consumers and the index writer report to it without waiting for an answer; it
writes the view to `shard_status` every few seconds, for `lap status`. The
exact figures are the ones committed with each batch (`stage_counts`); this view
is for watching, so losing a few seconds of it in a crash costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from lap.settings import load_settings
from lap.stores import Stores

log = logging.getLogger("lap.audit")

NAMESPACE = "lap"
AUDIT_ACTOR = "lap-audit"


@ray.remote(max_restarts=-1, max_task_retries=-1)
class AuditActor:
    def __init__(self) -> None:
        self.settings = load_settings()
        self.shards: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task | None = None

    def _shard(self, shard_id: str) -> dict[str, Any]:
        return self.shards.setdefault(shard_id, {"lag_ms": None, "archived_seq": None, "indexed_seq": None,
                                                 "node": None, "archived": 0, "aggregated": 0, "indexed": 0,
                                                 "duplicates": 0, "dirty": True})

    def consumer_report(self, shard_id: str, report: dict[str, Any]) -> None:
        shard = self._shard(shard_id)
        if report.get("lag_ms") is not None:
            shard["lag_ms"] = report["lag_ms"]
        if report.get("node"):
            shard["node"] = report["node"]
        if "last_seq" in report:
            shard["archived_seq"] = report["last_seq"]
            shard["archived"] += report["kept"]
            shard["aggregated"] += report["kept"]
            shard["duplicates"] += report["duplicates"]
        shard["dirty"] = True

    def index_report(self, shard_id: str, last_seq: str, indexed: int) -> None:
        shard = self._shard(shard_id)
        shard["indexed_seq"] = last_seq
        shard["indexed"] += indexed
        shard["dirty"] = True

    async def run(self) -> None:
        """Flush the view to Postgres until the actor stops (idempotent: a second call waits on the first)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush_loop())
        await asyncio.shield(self._task)

    async def _flush_loop(self) -> None:
        stores = Stores(self.settings, pool=True)
        while True:
            await asyncio.sleep(self.settings.process.audit_flush_s)
            try:
                await self.flush((await stores.open()).pool)
            except Exception as exc:  # Postgres away: the view stays in memory and goes out next time
                log.warning("audit flush failed: %s", exc)

    async def flush(self, pool) -> None:
        dirty = [(k, s) for k, s in self.shards.items() if s["dirty"]]
        if not dirty:
            return
        counters = ("archived", "aggregated", "indexed", "duplicates")
        sent = [{c: s[c] for c in counters} for _, s in dirty]  # reports may arrive during the write
        async with pool.acquire() as conn:
            # the counters here are since this actor started; the stored ones are added to, not replaced
            await conn.executemany(
                """INSERT INTO shard_status AS t (stream, shard_id, lag_ms, archived_seq, indexed_seq,
                                                  archived, aggregated, indexed, duplicates, consumer_node, updated_at)
                   VALUES ($1, $2, $3, $4::numeric, $5::numeric, $6, $7, $8, $9, $10, now())
                   ON CONFLICT (stream, shard_id) DO UPDATE SET
                       lag_ms = coalesce(excluded.lag_ms, t.lag_ms),
                       archived_seq = coalesce(excluded.archived_seq, t.archived_seq),
                       indexed_seq = coalesce(excluded.indexed_seq, t.indexed_seq),
                       consumer_node = coalesce(excluded.consumer_node, t.consumer_node),
                       archived = t.archived + excluded.archived, aggregated = t.aggregated + excluded.aggregated,
                       indexed = t.indexed + excluded.indexed, duplicates = t.duplicates + excluded.duplicates,
                       updated_at = now()""",
                [(self.settings.stream.name, k, s["lag_ms"], s["archived_seq"], s["indexed_seq"],
                  *(n[c] for c in counters), s["node"]) for (k, s), n in zip(dirty, sent)])
        for (_, s), n in zip(dirty, sent):  # what went out is not sent again
            for c in counters:
                s[c] -= n[c]
            s["dirty"] = any(s[c] for c in counters)  # a report that came during the write goes out next time

