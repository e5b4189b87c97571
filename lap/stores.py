"""The stores a component uses (Postgres, S3, Kinesis, OpenSearch), opened together and closed together.

Every component names what it needs, and gets one object holding it:

    async with Stores(settings, pool=True, s3=True) as stores:
        ... stores.pool, stores.s3 ...

A long-lived one (a Serve replica, the coordinator) calls `open()` wherever
it needs the stores: the first call opens them, concurrent calls wait for it,
later ones return at once. A Serve replica calls `close()` on shutdown; an
actor's stores go with its process. A store that fails to open closes those
opened before it, so a retry starts clean. A store not asked for stays None.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from typing import Any

from lap.settings import Settings

log = logging.getLogger("lap.stores")

POOL_CLOSE_S = 5.0  # a query still running past this: its connections are dropped


class Stores:
    def __init__(self, settings: Settings, *, pool: bool = False, background: bool = False, s3: bool = False,
                 kinesis: bool = False, records: bool = False, search: bool = False):
        """`kinesis` is the aiobotocore client; `records` is LAP's own Kinesis client for the hot path
        (PutRecords and GetRecords without botocore's cost per record). `background`: the pool is the
        processing side's, whose local Postgres work waits behind ingest's (lap/sinks/store.py)."""
        self.settings = settings
        self.wanted = {"pool": pool, "s3": s3, "kinesis": kinesis, "records": records, "search": search}
        self.background = background
        self.pool: Any = None
        self.s3: Any = None
        self.kinesis: Any = None
        self.records: Any = None
        self.search: Any = None
        self._stack: AsyncExitStack | None = None
        self._opening = asyncio.Lock()

    @property
    def opened(self) -> bool:
        return self._stack is not None

    async def open(self) -> "Stores":
        if self._stack is not None:
            return self
        async with self._opening:
            if self._stack is None:
                await self._open_all()
        return self

    async def _open_all(self) -> None:
        s = self.settings
        stack = AsyncExitStack()
        try:
            if self.wanted["pool"]:
                from lap.sinks.store import create_pool

                self.pool = await create_pool(s, background=self.background)
                stack.push_async_callback(close_pool, self.pool)
            if self.wanted["s3"] or self.wanted["kinesis"]:
                from lap.aws import open_client

                if self.wanted["s3"]:
                    self.s3 = await open_client(stack, s, "s3")
                if self.wanted["kinesis"]:
                    self.kinesis = await open_client(stack, s, "kinesis")
            if self.wanted["records"]:
                from lap.stream.records_client import RecordsClient

                self.records = RecordsClient(s)
                stack.push_async_callback(self.records.close)
            if self.wanted["search"]:
                from lap.sinks.index import open_opensearch

                self.search = open_opensearch(s)
                stack.push_async_callback(self.search.close)
        except BaseException:
            await stack.aclose()
            self.pool = self.s3 = self.kinesis = self.records = self.search = None
            raise
        self._stack = stack

    async def close(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> "Stores":
        return await self.open()

    async def __aexit__(self, *exc_info) -> None:
        await self.close()


async def close_pool(pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), POOL_CLOSE_S)
    except TimeoutError:  # a query still running: its connection goes with the process
        log.warning("Postgres pool not closed within %.0f s; its connections are dropped", POOL_CLOSE_S)
        pool.terminate()
