"""Coordinator: runs one ShardConsumer per shard that is ready, and, every `process.sweep_interval_s`,
the Sweeper's housekeeping (lap/process/sweeper.py).

A shard is ready when it is not finished and every parent it has (after a split
or a merge) is finished: a parent is drained before its children start, so one
learner's events are processed in order across a reshard. Shards, leases and
checkpoints live in Postgres (lap/process/leases.py), so a restarted
coordinator (or cluster) resumes where it stopped. Consumers are owned by the
coordinator: if it dies they go with it, and its restart starts them again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lap.audit.actor import NAMESPACE
from lap.process import leases
from lap.process.consumer import ShardConsumer, ShardEnd
from lap.process.sweeper import Sweeper
from lap.settings import load_settings
from lap.stores import Stores
from lap.stream.kinesis import list_shards

log = logging.getLogger("lap.process")

COORDINATOR = "lap-coordinator"
# Ray places an actor that asks for no resources wherever it likes, ignoring its node affinity (measured on a
# three-node cluster: 1 of 4 on the node asked for; with 0.01 CPU, 4 of 4). So a consumer asks for at least this.
CONSUMER_MIN_CPUS = 0.01


def consumer_name(shard_id: str) -> str:
    return f"lap-shard-{shard_id}"


def ready_shards(checkpoints: dict[str, dict[str, Any]]) -> list[str]:
    """Shards to consume now: not finished, and every known parent finished."""
    ready = []
    for shard_id, row in sorted(checkpoints.items()):
        if row["finished"]:
            continue
        parents = [p for p in row["parent_ids"] if p in checkpoints]  # a parent gone from the stream has nothing left
        if all(checkpoints[p]["finished"] for p in parents):
            ready.append(shard_id)
    return ready


@ray.remote(max_restarts=-1, max_task_retries=-1)
class Coordinator:
    def __init__(self) -> None:
        self.settings = load_settings()
        self.consumers: dict[str, Any] = {}
        self.placed: dict[str, str] = {}  # shard id -> the node its consumer was asked to start on
        self.runs: dict[str, asyncio.Task] = {}
        self._task: asyncio.Task | None = None
        self.stores = Stores(self.settings, pool=True, s3=True, kinesis=True, search=True)

    def ping(self) -> bool:
        return True

    async def run(self) -> None:
        """Watch shards and consumers until the actor stops (a second call waits on the first)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.shield(self._task)

    async def _open(self) -> None:
        if not self.stores.opened:
            await self.stores.open()
            self.pool, self.kinesis = self.stores.pool, self.stores.kinesis
            self.sweeper = Sweeper(self.settings, self.pool, self.stores.s3, self.stores.search)

    async def _run(self) -> None:
        p = self.settings.process
        last_sweep = time.monotonic()
        while True:
            try:
                await self._open()
                await self.step()
                if time.monotonic() - last_sweep >= p.sweep_interval_s:
                    last_sweep = time.monotonic()
                    await self.sweep()
            except Exception as exc:  # Kinesis or Postgres away: consumers keep running; look again later
                log.warning("coordinator step failed: %s", exc)
            await asyncio.sleep(p.coordinator_interval_s)

    async def sweep(self, grace_s: float | None = None) -> int:
        """The housekeeping, now (tests and operators need not wait for the next round); orphans removed."""
        await self._open()
        return await self.sweeper.sweep(grace_s)

    async def report_reconcile(self, end: datetime | None = None) -> dict[str, dict[str, int]]:
        await self._open()
        return await self.sweeper.report_reconcile(end)

    async def step(self) -> None:
        stream = self.settings.stream.name
        shards = await list_shards(self.kinesis, self.settings)
        checkpoints = await leases.register_shards(self.pool, stream, shards)
        self.reap()
        for shard_id in ready_shards(checkpoints):
            if shard_id not in self.runs:
                self.start(shard_id)
        for shard_id, row in checkpoints.items():
            if row["finished"] and shard_id in self.consumers and shard_id not in self.runs:
                ray.kill(self.consumers.pop(shard_id), no_restart=True)  # its process is no longer needed

    def start(self, shard_id: str) -> None:
        handle = self.consumers.get(shard_id)
        if handle is None:
            handle = ShardConsumer.options(
                name=consumer_name(shard_id), namespace=NAMESPACE, get_if_exists=True,
                num_cpus=max(self.settings.process.actor_num_cpus, CONSUMER_MIN_CPUS),
                scheduling_strategy=self.placement(shard_id),
            ).remote(shard_id)
            self.consumers[shard_id] = handle
        self.runs[shard_id] = asyncio.get_running_loop().create_task(self._consume(shard_id, handle))

    def placement(self, shard_id: str) -> NodeAffinitySchedulingStrategy | str:
        """The live worker node with the fewest consumers this coordinator placed, asked softly.

        Ray's SPREAD is best effort: it put all four consumers on one of three
        nodes now and then. Soft affinity still lets Ray start (or restart) the
        consumer elsewhere when that node is full or gone. Nodes without CPUs
        (the cluster's head) are left out.
        """
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
        if not nodes:
            return "SPREAD"
        self.placed = {s: n for s, n in self.placed.items() if n in nodes and s in self.consumers}
        load = {n: 0 for n in nodes}
        for node in self.placed.values():
            load[node] += 1
        node = min(nodes, key=lambda n: (load[n], n))
        self.placed[shard_id] = node
        return NodeAffinitySchedulingStrategy(node_id=node, soft=True)

    async def _consume(self, shard_id: str, handle) -> ShardEnd:
        # Ray re-runs `run` itself when the actor restarts; this returns when the shard is done
        # or lost, or raises if the actor is gone for good (killed with no_restart).
        return await handle.run.remote()

    def reap(self) -> None:
        """Collect consumers whose run ended; those that must go on start again in this step."""
        for shard_id, task in list(self.runs.items()):
            if not task.done():
                continue
            del self.runs[shard_id]
            try:
                outcome = task.result()
            except Exception as exc:
                log.warning("consumer of shard %s ended with %s; starting it again", shard_id, exc)
                self.consumers.pop(shard_id, None)
                continue
            log.info("consumer of shard %s stopped (%s)", shard_id, outcome.value)
