"""Each shard as the audit side reads it: one query for `lap status`, /v1/audit/shards and /v1/pipeline, and how
far each consumer has come, for reconcile.

The live figures come from `shard_status`, which the AuditActor writes every few
seconds; the checkpoint and lease from `shard_checkpoints` (written only by
lap/process/leases.py); the index writer's position from `index_cursors`.
"""

from __future__ import annotations

from datetime import datetime, timezone


async def shard_view(conn, stream: str) -> list:
    """Every shard of the stream, ordered by id; `index_backlog` counts the committed batches the index writer
    has still to reach."""
    return await conn.fetch(
        """SELECT c.shard_id, c.parent_ids, c.finished, c.sequence_number,
                  c.lease_owner IS NOT NULL AND c.lease_expires > now() AS leased,
                  i.last_seq AS indexed_to, s.lag_ms, s.consumer_node, s.updated_at,
                  coalesce(s.archived, 0) AS archived, coalesce(s.indexed, 0) AS indexed,
                  coalesce(s.duplicates, 0) AS duplicates,
                  (SELECT count(*) FROM batches b WHERE b.stream = c.stream AND b.shard_id = c.shard_id
                      AND (i.last_seq IS NULL OR b.first_seq > i.last_seq)) AS index_backlog
             FROM shard_checkpoints c
             LEFT JOIN index_cursors i ON i.stream = c.stream AND i.shard_id = c.shard_id
             LEFT JOIN shard_status s ON s.stream = c.stream AND s.shard_id = c.shard_id
            WHERE c.stream = $1 ORDER BY c.shard_id""", stream)


def consumer_state(row) -> str:
    return "finished" if row["finished"] else ("consuming" if row["leased"] else "waiting")


async def consumers_reached(conn, stream: str) -> dict[str, datetime | None]:
    """Per shard, the newest receipt time its consumer has committed (None: nothing yet; a finished shard has
    reached the end of time): reconcile calls what lies beyond it pending, not missing."""
    rows = await conn.fetch("SELECT shard_id, received_at, finished FROM shard_checkpoints WHERE stream = $1",
                            stream)
    return {r["shard_id"]: (datetime.max.replace(tzinfo=timezone.utc) if r["finished"] else r["received_at"])
            for r in rows}
