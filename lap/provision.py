"""Creates what LAP needs before it serves: database schema, stream, bucket, index template.

Every step is idempotent, so `lap up` runs it on each start. It creates what
is missing, applies new migrations and puts LAP's index template only when this
release's is newer; it never changes a stream's shards or a bucket.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from lap.aws import open_client
from lap.settings import Settings
from lap.sinks.archive import ensure_bucket
from lap.sinks.index import (
    ensure_templates,
    has_event_indices,
    open_opensearch,
    reset_index_progress,
)
from lap.sinks.store import connect, ensure_database, migrate
from lap.stream.kinesis import ensure_stream


async def provision(settings: Settings) -> dict[str, str]:
    """Returns one line per resource, for the start-up report."""
    done: dict[str, str] = {}
    if "postgres" in settings.local_services():
        await ensure_database(settings)
    applied = await migrate(settings)
    done["postgres"] = f"migrations applied: {applied}" if applied else "schema up to date"

    async with AsyncExitStack() as stack:
        kinesis = await open_client(stack, settings, "kinesis")
        await ensure_stream(kinesis, settings)
        done["kinesis"] = f"stream {settings.stream.name} active"
        s3 = await open_client(stack, settings, "s3")
        await ensure_bucket(s3, settings)
        done["s3"] = f"bucket {settings.archive.bucket} ready"

    client = open_opensearch(settings)
    try:
        await ensure_templates(client, settings)
        empty = not await has_event_indices(client, settings)
    finally:
        await client.close()
    done["opensearch"] = f"index template {settings.index.index_prefix} ready"
    if empty:  # a new domain, or the in-memory stand-in after a (re)start: index again from the archive
        conn = await connect(settings)
        try:
            if await conn.fetchval("SELECT count(*) FROM batches"):
                batches = await reset_index_progress(conn, settings)
                done["opensearch"] += (f"; the index is empty: new events are indexed at once, and {batches:,} "
                                       "archived batches are being indexed again behind them")
        finally:
            await conn.close()
    return done
