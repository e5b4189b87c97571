"""LAP's index on the real OpenSearch the session runs: what an in-memory stand-in let pass.

The searches themselves (date histograms in time zones, cardinality, windows
with far offsets, paging) are proven in tests/test_output.py against the same
engine; these are the documents and the template.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import httpx
import orjson

from lap.samples import envelope
from lap.sinks.index import (
    KEYWORD, MAX_DOCUMENT_ID_BYTES, TEMPLATE_VERSION, document_id, ensure_templates, events_template, index_name,
    open_opensearch,
)
from tests.support.api import get, key
from tests.support.stack import run_lap
from tests.support.traffic import make_events, new_tenant, send, wait_for


async def test_long_iris_and_long_entity_ids_are_indexed_and_found(lap_up, settings, db):
    """Lucene refuses a term over 32,766 bytes and OpenSearch an `_id` over 512: neither may cost a document."""
    tenant, token = new_tenant(lap_up)
    reader = key(lap_up, tenant, "reader")
    started = datetime.now(timezone.utc)
    event = make_events(1)[0]
    event["object"] = event["object"]["id"] + "/" + "a" * 40_000  # as an IRI: over Lucene's 32,766 bytes
    entity = {"id": "https://example.edu/things/" + "x" * 600, "type": "DigitalResource", "name": "long"}
    assert len(entity["id"]) > MAX_DOCUMENT_ID_BYTES and document_id(entity["id"]) != entity["id"]
    send(settings, token, [orjson.dumps(envelope([event, entity]))])
    await wait_for(db, tenant, {"archived": 2, "indexed": 2}, settings=settings)
    assert await db.fetchval("SELECT count(*) FROM index_failures WHERE tenant = $1", tenant) == 0

    found = get(settings, reader, f"/events/{quote(entity['id'], safe='')}")
    assert found.status_code == 200, found.text
    assert found.json()["event_id"] == entity["id"] and found.json()["event"]["name"] == "long"
    page = get(settings, reader, "/events", type="DigitalResource").json()["events"]
    assert [e["event_id"] for e in page] == [entity["id"]]
    long_object = get(settings, reader, f"/events/{event['id']}").json()
    assert long_object["object"] == event["object"]  # kept whole in the source, though too long to search
    span = ["--start", (started - timedelta(minutes=1)).isoformat(),
            "--end", (datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat()]
    report = run_lap("reconcile", "--tenant", tenant, *span, "--ids", "--json", config=lap_up.config)
    assert '"complete": true' in report.stdout, report.stdout


async def test_an_index_made_by_the_previous_template_takes_the_new_one(settings):
    """Indices of template 2 keep their fields' indexing; they get the new fields, `ignore_above` and the replica
    setting, and then take documents of today's writer."""
    from lap.process.index_writer import bulk_index

    prefix = f"lap-upgrade-{uuid.uuid4().hex[:8]}"
    upgraded = settings.model_copy(update={"index": settings.index.model_copy(update={"index_prefix": prefix})})
    older = events_template(upgraded)
    older["version"] = 2
    properties = older["template"]["mappings"]["properties"]
    for field in ("event_id", "tenant", "sensor", "type", "action", "actor", "object", "course"):
        properties[field] = {"type": "keyword"}  # as template 2 made them: indexed, with doc values
    del properties["event_iri"]
    older["template"]["settings"] = {"number_of_shards": 1, "refresh_interval": "5s"}
    search = open_opensearch(settings)
    tenant = "upgrade"
    try:
        await search.indices.put_index_template(name=prefix, body=older)
        await search.indices.create(index=index_name(upgraded, tenant))
        await ensure_templates(search, upgraded)
        template = (await search.indices.get_index_template(name=prefix))["index_templates"][0]["index_template"]
        assert template["version"] == TEMPLATE_VERSION
        mapping = (await search.indices.get_mapping(index=index_name(upgraded, tenant)))
        fields = next(iter(mapping.values()))["mappings"]["properties"]
        assert fields["event_iri"] == {"type": "keyword", "index": False, "doc_values": False}
        assert fields["sensor"] == KEYWORD  # its doc values kept, as made
        index_settings = await search.indices.get_settings(index=index_name(upgraded, tenant))
        assert next(iter(index_settings.values()))["settings"]["index"]["auto_expand_replicas"] == "0-1"
        received = datetime.now(timezone.utc).isoformat()
        line = {"meta": {"event_id": "https://example.edu/e/" + "y" * 700, "tenant": tenant, "sensor": "s",
                         "type": "Entity", "action": None, "learner": None, "course": None, "event_time": None,
                         "received_at": received},
                "item": {"id": "https://example.edu/e/" + "y" * 700}}
        ok, counted, refused = await bulk_index(search, upgraded, [line], 1)
        assert (len(ok), len(counted), refused) == (1, 1, [])
    finally:
        await search.indices.delete(index=f"{prefix}-*", params={"ignore_unavailable": "true"})
        await search.indices.delete_index_template(name=prefix, ignore=[404])
        await search.close()


def test_the_local_node_is_a_real_opensearch_on_loopback_with_its_heap(lap_up, settings):
    local = settings.local
    info = httpx.get(f"http://127.0.0.1:{local.opensearch_port}/", timeout=30).json()
    assert info["version"]["distribution"] == "opensearch" and info["version"]["number"].startswith("2.19.")
    nodes = httpx.get(f"http://127.0.0.1:{local.opensearch_port}/_nodes/jvm,transport,http,plugins",
                      timeout=30).json()["nodes"]
    (node,) = nodes.values()
    assert node["jvm"]["mem"]["heap_max_in_bytes"] == local.opensearch_heap_mb * 2**20
    assert node["transport"]["publish_address"] == f"127.0.0.1:{local.opensearch_transport_port}"
    assert node["http"]["bound_address"] == [f"127.0.0.1:{local.opensearch_port}"]
    assert {m["name"] for m in node["modules"]} >= {"transport-netty4", "reindex"}
    paths = httpx.get(f"http://127.0.0.1:{local.opensearch_port}/_nodes/settings", timeout=30).json()["nodes"][
        next(iter(nodes))]["settings"]["path"]["data"]
    assert [str(settings.data_dir / "opensearch" / "data")] == ([paths] if isinstance(paths, str) else paths)
