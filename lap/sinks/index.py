"""The OpenSearch index: client and the explicit template for `lap-events-*`.

A document holds the fields people search and sort on, and `batch`: the
committed batch whose archive object holds the whole event (GET
/v1/events/{id} reads it from there). Documents of template version 1 also
carry the event itself (`event`, stored, not indexed) and are still read.
The mapping is strict, so a sensor's extensions can never explode it.
"""

from __future__ import annotations

import hashlib
from typing import Any

from opensearchpy import AsyncOpenSearch

from lap.settings import Settings

TEMPLATE_VERSION = 3
# Lucene refuses a term over 32,766 bytes, and with it the whole document: a longer IRI (up to 4 bytes a
# character) is kept in the document's source but not made searchable.
KEYWORD = {"type": "keyword", "ignore_above": 8191}
# Fields only filtered on need no doc values (those serve sorts and aggregations): a quarter less of
# OpenSearch's CPU per document (docs/decisions.md, "Index on a real OpenSearch").
FILTERED = {**KEYWORD, "doc_values": False}
# One replica where there is a second node to hold it (Amazon OpenSearch Service), none on a single node (the
# local one), which is then green rather than yellow.
INDEX_SETTINGS = {"number_of_shards": 1, "auto_expand_replicas": "0-1", "refresh_interval": "5s"}


def events_template(settings: Settings) -> dict[str, Any]:
    keyword = KEYWORD
    return {
        "index_patterns": [f"{settings.index.index_prefix}-*"],
        "version": TEMPLATE_VERSION,
        "template": {
            "settings": INDEX_SETTINGS,
            "mappings": {
                "dynamic": "strict",
                # searchable, but not stored again in the source: the id is the document's `_id`, and the
                # actor is the learner unless `actor_iri` says otherwise
                "_source": {"excludes": ["event_id", "tenant", "actor"]},
                "properties": {
                    "event_id": {"type": "keyword", "index": False},  # sorts (a search's tie-break) only
                    "sensor": FILTERED,
                    "type": FILTERED,
                    "action": FILTERED,
                    "learner": keyword,  # counted distinct per course
                    "actor": FILTERED,
                    "object": FILTERED,
                    "course": FILTERED,
                    "event_time": {"type": "date"},
                    "received_at": {"type": "date"},
                    "batch": {"type": "long", "index": False},
                    "actor_iri": {"type": "keyword", "index": False, "doc_values": False},
                    "event_iri": {"type": "keyword", "index": False, "doc_values": False},
                    # older documents only: the tenant (each tenant has its own index), the whole event (version
                    # 1), and fields no query used
                    "tenant": keyword,
                    "object_type": keyword,
                    "shard": keyword,
                    "sequence": keyword,
                    "event": {"type": "object", "enabled": False},
                },
            },
        },
    }


# OpenSearch refuses a longer document id. Event ids are UUID URNs; a described entity's id is any IRI.
MAX_DOCUMENT_ID_BYTES = 512


def document_id(event_id: str) -> str:
    """The `_id` of an event's document: the event's id, or, for an id longer than OpenSearch takes, a digest of
    it, which no IRI can equal (it holds a space); the document then keeps the id itself as `event_iri`."""
    if len(event_id) <= MAX_DOCUMENT_ID_BYTES // 4 or len(event_id.encode()) <= MAX_DOCUMENT_ID_BYTES:
        return event_id
    return "sha256 " + hashlib.sha256(event_id.encode()).hexdigest()


def index_name(settings: Settings, tenant: str) -> str:
    """Each tenant has its own index, so an event id sent by one tenant can never overwrite another's.

    Index names are lower case, so the name also carries a short hash of the
    tenant as written: "Acme" and "acme" (or a tenant named like another's
    hashed name) never share an index.
    """
    digest = hashlib.sha256(tenant.encode()).hexdigest()[:8]
    return f"{settings.index.index_prefix}-{tenant.lower()}-{digest}"


def open_opensearch(settings: Settings) -> AsyncOpenSearch:
    auth = None
    if settings.index.username and settings.index.password:
        auth = (settings.index.username, settings.index.password.get_secret_value())
    return AsyncOpenSearch(
        hosts=[settings.index.url],
        http_auth=auth,
        verify_certs=settings.index.verify_certs,
        timeout=10,
        max_retries=2,
        retry_on_timeout=True,
    )


async def ensure_templates(client: AsyncOpenSearch, settings: Settings) -> None:
    """Put LAP's template when it is missing or older than this release's; never downgrade it."""
    name = settings.index.index_prefix
    if await client.indices.exists_index_template(name=name):
        current = await client.indices.get_index_template(name=name)
        versions = [t["index_template"].get("version") or 0 for t in current.get("index_templates", [])]
        if versions and max(versions) >= TEMPLATE_VERSION:
            return
    await client.indices.put_index_template(name=name, body=events_template(settings))
    if await has_event_indices(client, settings):  # indices made by an older template get what may change
        template = events_template(settings)["template"]
        fields = template["mappings"]["properties"]
        # a field's indexing and doc values stay as they were made by template 1 or 2 (a later version must not
        # put these on indices of version 3); new fields and `ignore_above` are taken
        older = {field: KEYWORD for field in ("event_id", "tenant", "sensor", "type", "action", "learner", "actor",
                                             "object", "course", "object_type", "shard", "sequence")}
        await client.indices.put_mapping(index=f"{name}-*", body={"properties": older | {
            field: fields[field] for field in ("batch", "actor_iri", "event_iri")}})
        await client.indices.put_settings(index=f"{name}-*", body={"index": {
            key: value for key, value in template["settings"].items() if key != "number_of_shards"}})


async def has_event_indices(client: AsyncOpenSearch, settings: Settings) -> bool:
    found = await client.indices.get(index=f"{settings.index.index_prefix}-*", allow_no_indices=True,
                                     expand_wildcards="all")
    return bool(found)


async def reset_index_progress(conn, settings: Settings) -> int:
    """Start indexing again for an index found empty (the in-memory stand-in after a start or restart, a new
    domain); returns the batches to backfill.

    Its cursors, counts and failures described documents that are gone. New
    batches are indexed at once (each shard's cursor moves to its last committed
    batch) and the batches up to there are backfilled behind them, from the
    archive, within the index's retention (`index_backfill`), and so are the
    batches replays stored (which the live cursors never index: a replay indexes
    its own).
    """
    stream = settings.stream.name
    since = settings.index_cutoff()
    async with conn.transaction():
        await conn.execute("DELETE FROM index_failures")
        await conn.execute("DELETE FROM stage_counts WHERE stage = 'indexed'")
        await conn.execute("DELETE FROM index_backfill WHERE stream = $1 OR stream LIKE 'replay:%'", stream)
        await conn.execute("DELETE FROM index_cursors WHERE stream = $1", stream)
        await conn.execute(
            """INSERT INTO index_cursors (stream, shard_id, last_seq)
               SELECT stream, shard_id, max(last_seq) FROM batches WHERE stream = $1 GROUP BY stream, shard_id""",
            stream)
        return await conn.fetchval(
            """WITH added AS (
                 INSERT INTO index_backfill (stream, shard_id, until_seq, since, batches_total)
                 SELECT stream, shard_id, max(last_seq), $2::timestamptz,
                        count(*) FILTER (WHERE $2::timestamptz IS NULL OR max_received_at >= $2)
                   FROM batches WHERE stream = $1 OR stream LIKE 'replay:%' GROUP BY stream, shard_id
                 RETURNING batches_total)
               SELECT coalesce(sum(batches_total), 0)::bigint FROM added""", stream, since)


async def rebuild_progress(conn, settings: Settings) -> tuple[int, int] | None:
    """(batches indexed again, batches to index again) while an index rebuild is under way, else None."""
    row = await conn.fetchrow(
        """SELECT count(*) AS shards, coalesce(sum(batches_done), 0)::bigint AS done,
                  coalesce(sum(batches_total), 0)::bigint AS total FROM index_backfill
            WHERE stream = $1 OR stream LIKE 'replay:%'""",
        settings.stream.name)
    return (row["done"], row["total"]) if row["shards"] else None


async def expire_documents(client: AsyncOpenSearch, settings: Settings) -> int:
    """Remove the documents past the index's retention; returns how many went."""
    cutoff = settings.index_cutoff()
    if cutoff is None:
        return 0
    reply = await client.delete_by_query(
        index=f"{settings.index.index_prefix}-*", params={"allow_no_indices": "true", "conflicts": "proceed"},
        body={"query": {"range": {"received_at": {"lt": cutoff.isoformat()}}}})
    return int(reply.get("deleted", 0))
