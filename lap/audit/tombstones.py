"""Tombstones: the erased learners (and deleted tenants) whose events no writer may store again.

Every writer of stored events filters its events through `Tombstones`. The
shard consumers and replays, in the transaction that commits a batch, take
STORE_LOCK shared and check that the list has not changed since they filtered
(`confirm`); the index writer holds INDEX_LOCK shared for the whole of a batch,
from reading the list to its commit. An erasure adds its tombstone holding both
exclusively, so once that commits, every batch either saw the tombstone or was
committed before it, and so is in what the erasure job finds
(docs/decisions.md, "Erasure").
"""

from __future__ import annotations

import hashlib
from typing import Any

from lap.process.dedup import fingerprint

# pg_advisory_xact_lock keys
STORE_LOCK = int.from_bytes(b"LAPERASE", "big", signed=True)
INDEX_LOCK = int.from_bytes(b"LAPERIDX", "big", signed=True)
ERASED_PREFIX = "erased:"  # an erased event's id in a receipt: "erased:" and its fingerprint


def learner_hash(tenant: str, learner: str) -> str:
    """What a tombstone keeps of a learner: enough to know their events again, not their IRI."""
    return hashlib.sha256(f"{tenant}\x00{learner}".encode()).hexdigest()


def erased_id(tenant: str, event_id: str) -> str:
    return f"{ERASED_PREFIX}{fingerprint(tenant, event_id):016x}"


def signed64(value: int) -> int:
    """A fingerprint (unsigned 64 bits) as Postgres' bigint holds it."""
    return value - (1 << 64) if value >= 1 << 63 else value


class TombstonesMoved(Exception):
    """An erasure began after this batch was filtered: filter it again."""


class Tombstones:
    """The tombstones as of `version` (the newest erasure's id), read from Postgres when that moves."""

    def __init__(self) -> None:
        self.version = -1  # not read yet
        self.tenants: dict[str, int] = {}  # tenant -> erasure id, for deleted tenants
        self.learners: dict[str, dict[str, int]] = {}  # tenant -> learner hash -> erasure id
        self._hashes: dict[tuple[str, str], str] = {}

    def __bool__(self) -> bool:
        return bool(self.tenants or self.learners)

    async def refresh(self, conn) -> bool:
        """Read the tombstones if they changed; whether they did."""
        version = await conn.fetchval("SELECT coalesce(max(id), 0) FROM erasures")
        if version == self.version:
            return False
        rows = await conn.fetch("SELECT id, tenant, learner_hash FROM erasures WHERE id <= $1", version)
        self.tenants = {r["tenant"]: r["id"] for r in rows if r["learner_hash"] is None}
        self.learners = {}
        for r in rows:
            if r["learner_hash"] is not None:
                self.learners.setdefault(r["tenant"], {})[r["learner_hash"]] = r["id"]
        self.version = version
        self._hashes.clear()
        return True

    async def confirm(self, conn) -> None:
        """In a commit's transaction: hold off new tombstones until it ends, and raise TombstonesMoved if one was
        added since the events were filtered."""
        await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", STORE_LOCK)
        if await conn.fetchval("SELECT coalesce(max(id), 0) FROM erasures") != self.version:
            raise TombstonesMoved()

    def erasure_of(self, meta: dict[str, Any]) -> int | None:
        """The erasure that covers an event (by its metadata), or None.

        A learner's events are those whose learner they are, and a describe of the
        learner themself (an entity whose id is the learner's IRI)."""
        tenant = meta["tenant"]
        whole = self.tenants.get(tenant)
        if whole is not None:
            return whole
        hashes = self.learners.get(tenant)
        if not hashes:
            return None
        learner = meta.get("learner") or (meta["event_id"] if meta.get("kind") == "entity" else None)
        if not learner:
            return None
        key = (tenant, learner)
        digest = self._hashes.get(key)
        if digest is None:
            if len(self._hashes) > 100_000:
                self._hashes.clear()
            digest = self._hashes[key] = learner_hash(tenant, learner)
        return hashes.get(digest)
