"""Shard leases and checkpoints: the one owner of `shard_checkpoints`, LAP's lease table.

As in the Kinesis Client Library, a consumer takes a shard's lease (a new
epoch), renews it while idle, fences each batch's transaction with it (the
epoch is checked and the row locked until commit), moves the checkpoint in
that same transaction, and marks a closed shard finished once it is drained.
A consumer whose epoch is no longer the shard's is a zombie: `LeaseLost`.

The coordinator registers the stream's shards here, and consumers read their
ancestry here. The audit side only reads the table, in lap/audit/shards.py
(what people watch, and how far each consumer has come for reconcile); the
index writer's batch query joins it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from lap.settings import Settings


class LeaseLost(Exception):
    """Another consumer holds this shard now; this one must stop without committing."""


@dataclass
class Lease:
    """A consumer's hold on one shard, at one epoch."""

    stream: str
    shard_id: str
    owner: str
    epoch: int
    ttl: timedelta
    checkpoint: int | None  # the last sequence number committed when the lease was taken; None: from the start
    finished: bool  # the shard was closed and fully processed: nothing is left to do

    async def renew(self, pool) -> None:
        """Keep the lease while no batch commits (each commit renews it too)."""
        async with pool.acquire() as conn:
            done = await conn.execute(
                """UPDATE shard_checkpoints SET lease_expires = now() + $4::interval, updated_at = now()
                    WHERE stream = $1 AND shard_id = $2 AND lease_epoch = $3""",
                self.stream, self.shard_id, self.epoch, self.ttl)
        if done != "UPDATE 1":
            raise LeaseLost(f"shard {self.shard_id}: lease taken over while idle")

    async def fence(self, conn) -> None:
        """Inside a batch's transaction: raise LeaseLost unless this epoch is the shard's, and hold the row
        until commit, so that no one takes the lease between this check and the checkpoint."""
        epoch = await conn.fetchval(
            "SELECT lease_epoch FROM shard_checkpoints WHERE stream = $1 AND shard_id = $2 FOR UPDATE",
            self.stream, self.shard_id)
        if epoch != self.epoch:
            raise LeaseLost(f"shard {self.shard_id}: lease epoch is {epoch}, this consumer holds {self.epoch}")

    async def advance(self, conn, last: int, newest: datetime | None) -> None:
        """Move the checkpoint to `last` (in the fenced transaction that stored the batch) and renew the lease.
        `newest` is the batch's newest receipt time: reconcile knows what the consumer has reached by it."""
        await conn.execute(
            """UPDATE shard_checkpoints
                  SET sequence_number = $3, lease_expires = now() + $4::interval, updated_at = now(),
                      received_at = greatest(received_at, $5)
                WHERE stream = $1 AND shard_id = $2""",
            self.stream, self.shard_id, Decimal(last), self.ttl, newest)

    async def finish(self, pool) -> None:
        """A closed shard is drained: mark it finished (its children may start) and let the lease go."""
        async with pool.acquire() as conn:
            done = await conn.execute(
                """UPDATE shard_checkpoints SET finished = true, lease_owner = NULL, updated_at = now()
                    WHERE stream = $1 AND shard_id = $2 AND lease_epoch = $3""",
                self.stream, self.shard_id, self.epoch)
        if done != "UPDATE 1":
            raise LeaseLost(f"shard {self.shard_id}: lease taken over before the shard could be marked finished")


async def take(pool, settings: Settings, shard_id: str, owner: str) -> Lease | None:
    """The shard's lease at a new epoch, or None while someone else's lease is live."""
    ttl = timedelta(seconds=settings.process.lease_ttl_s)
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """UPDATE shard_checkpoints
                  SET lease_owner = $3, lease_epoch = lease_epoch + 1,
                      lease_expires = now() + $4::interval, updated_at = now()
                WHERE stream = $1 AND shard_id = $2
                  AND (lease_owner IS NULL OR lease_owner = $3 OR lease_expires < now())
            RETURNING lease_epoch, sequence_number, finished""",
            settings.stream.name, shard_id, owner, ttl)
    if row is None:
        return None
    seq = row["sequence_number"]
    return Lease(settings.stream.name, shard_id, owner, row["lease_epoch"], ttl,
                 int(seq) if seq is not None else None, row["finished"])


async def register_shards(pool, stream: str, shards: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Add the shards the stream lists (with their parents) to the table; every shard's row, by id."""
    async with pool.acquire() as conn:
        await conn.executemany(
            """INSERT INTO shard_checkpoints (stream, shard_id, parent_ids) VALUES ($1, $2, $3)
               ON CONFLICT (stream, shard_id) DO NOTHING""",
            [(stream, s["ShardId"], [p for p in (s.get("ParentShardId"), s.get("AdjacentParentShardId")) if p])
             for s in shards])
        rows = await conn.fetch("SELECT shard_id, parent_ids, finished FROM shard_checkpoints WHERE stream = $1",
                                stream)
    return {r["shard_id"]: dict(r) for r in rows}


async def ancestors(pool, stream: str, shard_id: str) -> list[str]:
    """The shards this one came from by splits and merges, parents first: their dedup state is handed down."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """WITH RECURSIVE up(shard_id, depth) AS (
                   SELECT unnest(parent_ids), 1 FROM shard_checkpoints WHERE stream = $1 AND shard_id = $2
                   UNION
                   SELECT unnest(c.parent_ids), up.depth + 1 FROM shard_checkpoints c
                     JOIN up ON c.stream = $1 AND c.shard_id = up.shard_id WHERE up.depth < 64)
               SELECT shard_id, min(depth) AS depth FROM up GROUP BY shard_id ORDER BY 2, 1""", stream, shard_id)
    return [r["shard_id"] for r in rows]
