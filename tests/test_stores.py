"""The store bundle (lap/stores.py) against the session's real stand-ins."""

from __future__ import annotations

import asyncio
import gc
import uuid

import asyncpg
import pytest
from pydantic import SecretStr

from lap.stores import Stores
from tests.support.stack import free_port


async def test_the_bundle_opens_what_is_asked_and_closes_it(settings):
    stores = Stores(settings, pool=True, s3=True, kinesis=True, records=True, search=True)
    async with stores:
        assert await stores.pool.fetchval("SELECT 1") == 1
        assert (await stores.s3.head_bucket(Bucket=settings.archive.bucket))["ResponseMetadata"]["HTTPStatusCode"] == 200
        names = [s["ShardId"] for s in await stores.records.list_shards(StreamName=settings.stream.name)]
        described = await stores.kinesis.describe_stream_summary(StreamName=settings.stream.name)
        assert len(names) >= described["StreamDescriptionSummary"]["OpenShardCount"] > 0
        assert (await stores.search.info())["version"]["number"]
        pool = stores.pool
    assert not stores.opened
    assert pool.is_closing()

    only_s3 = Stores(settings, s3=True)
    async with only_s3:
        assert only_s3.s3 is not None
        assert (only_s3.pool, only_s3.kinesis, only_s3.records, only_s3.search) == (None, None, None, None)


async def test_concurrent_opens_make_one_set_of_stores(settings):
    """A long-lived component opens from several tasks at once (the coordinator's loop, a sweep, a report): one
    pool is made, and closing the bundle closes it; no second pool is left open behind it."""
    pools_before = {id(o) for o in live_pools()}
    stores = Stores(settings, pool=True, s3=True)
    opened = await asyncio.gather(*(stores.open() for _ in range(4)))
    assert all(o is stores for o in opened)
    assert await stores.pool.fetchval("SELECT 1") == 1
    await stores.close()
    made = [o for o in live_pools() if id(o) not in pools_before]
    assert len(made) == 1 and made[0].is_closing()


def live_pools() -> list:
    """The asyncpg pools this process holds (by exact type: isinstance on a dead weak proxy raises)."""
    return [o for o in gc.get_objects() if type(o) is asyncpg.Pool]


async def test_a_store_that_cannot_be_reached_leaves_nothing_open_and_a_retry_works(settings):
    """Postgres at a port where nothing listens: open() raises, nothing stays half-open, and the same bundle
    opens once the store is back (here: the right port)."""
    dsn = settings.db.dsn.get_secret_value().replace(f":{settings.local.postgres_port}/", f":{free_port()}/")
    assert dsn != settings.db.dsn.get_secret_value()
    unreachable = settings.model_copy(update={"db": settings.db.model_copy(update={"dsn": SecretStr(dsn)})})
    stores = Stores(unreachable, pool=True, s3=True)
    with pytest.raises(OSError):
        await stores.open()
    assert not stores.opened and stores.pool is None and stores.s3 is None

    stores.settings = settings
    async with stores:
        assert await stores.pool.fetchval("SELECT $1::text", marker := uuid.uuid4().hex) == marker
