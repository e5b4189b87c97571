"""POST /caliper and GET /caliper on the running LAP: every status code, durable receipts, quarantine."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import uuid
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import orjson
import pytest

from lap.aws import open_client
from lap.caliper import CALIPER_V1P1, CALIPER_V1P2
from lap.samples import EventFactory, envelope
from lap.stream import record_format
from lap.stream.shard_map import ShardMap

FIXTURES = Path(__file__).parent / "fixtures" / "caliper"


def headers(token: str | None, **extra: str) -> dict[str, str]:
    out = {"Content-Type": "application/json"}
    if token:
        out["Authorization"] = f"Bearer {token}"
    out.update(extra)
    return out


@pytest.fixture
async def api(settings):
    async with httpx.AsyncClient(base_url=settings.api_url, timeout=30) as client:
        yield client


def fresh_events(n: int, seed: int | None = None) -> list[dict]:
    return EventFactory(seed=seed if seed is not None else uuid.uuid4().int % 10**9).events(n)


def assert_problem(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")
    body = reply.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["request_id"]
    return body


async def test_accepted_envelope_is_durably_in_the_stream_with_receipts(api, settings, tokens, db):
    events = fresh_events(50)
    reply = await api.post("/caliper", content=orjson.dumps(envelope(events)),
                           headers=headers(tokens["sensor"], Prefer="return=representation"))
    assert reply.status_code == 200, reply.text
    receipts = reply.json()["receipts"]
    assert [r["event_id"] for r in receipts] == [e["id"] for e in events]
    # one record per shard the request touched, each event at its own position inside it
    records = {(r["shard_id"], r["sequence_number"]) for r in receipts}
    assert len(records) <= settings.stream.shards
    assert len({r["shard_id"] for r in receipts}) == len(records)
    for shard, seq in records:
        positions = [r["position"] for r in receipts if (r["shard_id"], r["sequence_number"]) == (shard, seq)]
        assert positions == list(range(len(positions)))

    async with AsyncExitStack() as stack:
        kinesis = await open_client(stack, settings, "kinesis")
        shards = ShardMap((await kinesis.list_shards(StreamName=settings.stream.name))["Shards"])
        for shard, seq in sorted(records):
            it = await kinesis.get_shard_iterator(
                StreamName=settings.stream.name, ShardId=shard,
                ShardIteratorType="AT_SEQUENCE_NUMBER", StartingSequenceNumber=seq)
            record = (await kinesis.get_records(ShardIterator=it["ShardIterator"], Limit=1))["Records"][0]
            assert record["Data"][:4] == b"LAP\x01"
            stored = record_format.decode(record["Data"])
            mine = [r for r in receipts if (r["shard_id"], r["sequence_number"]) == (shard, seq)]
            for (meta, item), receipt in zip(stored, mine, strict=True):
                event = next(e for e in events if e["id"] == receipt["event_id"])
                assert item == event  # the event exactly as sent
                assert meta["event_id"] == event["id"] and meta["tenant"] == "acme" and meta["kind"] == "event"
                assert meta["sensor"] == "https://lms.example.edu/sensors/lms" and meta["request_id"]
                learner = event["object"]["assignee"] if event["type"] == "GradeEvent" else event["actor"]["id"]
                assert meta["learner"] == learner and meta["course"] == event["group"]["id"]
                assert shards.shard_ids[shards.slot(learner)] == shard  # on the learner's own shard

    # The shard consumers write the receipts of what they read: the same record and position for each event.
    from tests.support.traffic import receipts_of

    ids = {e["id"] for e in events}
    for _ in range(100):
        found = await receipts_of(settings, "acme", datetime.now(timezone.utc) - timedelta(minutes=5))
        mine = {found.event_id[i]: (found.shard(i), str(found.seq(i)), int(found.position[i]))
                for i in range(len(found)) if found.event_id[i] in ids}
        if len(mine) == len(ids):
            break
        await asyncio.sleep(0.3)
    assert mine == {r["event_id"]: (r["shard_id"], r["sequence_number"], r["position"]) for r in receipts}


async def test_one_request_id_in_the_header_and_the_body(api, tokens):
    refused = await api.post("/caliper", content=b"{", headers=headers(tokens["sensor"]))
    assert refused.headers["x-request-id"] == assert_problem(refused, 400)["request_id"]
    reply = await api.post("/caliper", content=orjson.dumps(envelope(fresh_events(1))),
                           headers=headers(tokens["sensor"], Prefer="return=representation"))
    assert reply.headers["x-request-id"] == reply.json()["request_id"]
    mine = await api.post("/caliper", content=b"{", headers=headers(tokens["sensor"], **{"X-Request-ID": "sensor-42"}))
    assert mine.headers["x-request-id"] == assert_problem(mine, 400)["request_id"] == "sensor-42"


async def test_plain_success_has_an_empty_body(api, tokens):
    reply = await api.post("/caliper", content=orjson.dumps(envelope(fresh_events(3))), headers=headers(tokens["sensor"]))
    assert reply.status_code == 200 and reply.content == b""


async def test_gzip_bodies_are_accepted(api, tokens):
    body = gzip.compress(orjson.dumps(envelope(fresh_events(20))))
    reply = await api.post("/caliper", content=body, headers=headers(tokens["sensor"], **{"Content-Encoding": "gzip"}))
    assert reply.status_code == 200, reply.text


async def test_every_valid_fixture_is_accepted(api, tokens):
    docs = []
    for path in sorted((FIXTURES / "v1p2").glob("*.json")):
        doc = json.loads(path.read_text())
        if path.name.startswith("caliperEnvelope"):
            reply = await api.post("/caliper", content=path.read_bytes(), headers=headers(tokens["sensor"]))
            assert reply.status_code == 200, f"{path.name}: {reply.text}"
        elif path.name != "caliperEndpointConfigPayload.json":
            docs.append(doc)
    for start in range(0, len(docs), 40):
        reply = await api.post("/caliper", content=orjson.dumps(envelope(docs[start:start + 40])),
                               headers=headers(tokens["sensor"]))
        assert reply.status_code == 200, reply.text


async def test_every_invalid_fixture_is_refused_with_its_index_and_path(api, tokens):
    good = fresh_events(1)[0]
    for path in sorted((FIXTURES / "v1p2-invalid").glob("*.json")):
        raw = path.read_bytes()
        try:
            bad = json.loads(raw)
        except ValueError:  # a few fixtures are broken JSON on purpose: embed them as they are
            shell = orjson.dumps(envelope([good, {}]))
            reply = await api.post("/caliper", content=shell.replace(b",{}]", b"," + raw + b"]"),
                                   headers=headers(tokens["sensor"]))
            assert_problem(reply, 400)
            continue
        reply = await api.post("/caliper", content=orjson.dumps(envelope([good, bad])),
                               headers=headers(tokens["sensor"]))
        body = assert_problem(reply, 400)
        assert body["errors"], path.name
        assert all(e["index"] == 1 and e["path"].startswith("$.data[1]") for e in body["errors"]), (path.name, body)
        assert all(e["message"] for e in body["errors"])


async def test_caliper_1p1_envelopes_are_accepted(api, tokens):
    event = {
        "@context": CALIPER_V1P1, "id": f"urn:uuid:{uuid.uuid4()}", "type": "NavigationEvent",
        "actor": {"id": "https://example.edu/users/554433", "type": "Person"}, "action": "NavigatedTo",
        "object": {"id": "https://example.edu/pages/1", "type": "WebPage"},
        "eventTime": "2026-11-15T10:15:00.000Z",
    }
    reply = await api.post("/caliper", content=orjson.dumps(envelope([event], data_version=CALIPER_V1P1)),
                           headers=headers(tokens["sensor"]))
    assert reply.status_code == 200, reply.text


async def test_caliper_1p1_items_with_added_contexts_are_accepted(api, tokens):
    # the two 1.1 shapes of the spec's section 4.1: another context before Caliper's, and an entity under a
    # 1.1 profile extension context of its own inside a plain 1.1 event
    actor = {"id": "https://example.edu/users/554433", "type": "Person"}
    searched = {"@context": ["https://schema.org/docs/jsonldcontext.json", CALIPER_V1P1],
                "id": f"urn:uuid:{uuid.uuid4()}", "type": "Event", "actor": actor, "action": "Searched",
                "object": {"id": "https://example.edu/books/9780", "type": "Book", "isbn": "9780"},
                "query": "Event OR Entity", "eventTime": "2026-11-15T10:15:00.000Z"}
    survey = {"@context": f"{CALIPER_V1P1}/SurveyProfile-extension", "id": "https://example.edu/surveys/100",
              "type": "Survey", "name": "Course feedback"}
    viewed = {"@context": CALIPER_V1P1, "id": f"urn:uuid:{uuid.uuid4()}", "type": "Event", "actor": actor,
              "action": "Viewed", "object": survey, "eventTime": "2026-11-15T10:16:00.000Z"}
    reply = await api.post("/caliper", content=orjson.dumps(envelope([searched, viewed], data_version=CALIPER_V1P1)),
                           headers=headers(tokens["sensor"]))
    assert reply.status_code == 200, reply.text
    searched["@context"] = CALIPER_V1P1  # the Caliper context alone defines neither Book nor query
    searched["id"] = f"urn:uuid:{uuid.uuid4()}"
    body = assert_problem(await api.post("/caliper", content=orjson.dumps(envelope([searched], data_version=CALIPER_V1P1)),
                                         headers=headers(tokens["sensor"])), 400)
    assert {e["path"] for e in body["errors"]} == {"$.data[0].object", "$.data[0].query"}


def javascript_sensor_envelope(version: str) -> dict:
    """What IMS's JavaScript sensor (caliper-js) builds: scores as whole numbers (JavaScript writes 25.0 as 25), a
    sendTime with a +0000 offset, and entities referred to by their IRI alone."""
    base = "https://example.edu"
    assessment = f"{base}/terms/201601/courses/7/sections/1/assess/1"
    attempt = f"{assessment}/users/554433/attempts/1"
    graded = {"@context": version, "id": f"urn:uuid:{uuid.uuid4()}", "type": "GradeEvent", "action": "Graded",
              "actor": f"{base}/autograder", "eventTime": "2026-11-15T10:57:06.000Z",
              "object": {"id": attempt, "type": "Attempt", "assignee": f"{base}/users/554433",
                         "assignable": assessment, "count": 1},
              "generated": {"id": f"{attempt}/scores/1", "type": "Score", "attempt": attempt, "maxScore": 25,
                            "scoreGiven": 10, "scoredBy": f"{base}/autograder"}}
    submitted = {"@context": version, "id": f"urn:uuid:{uuid.uuid4()}", "type": "AssessmentEvent",
                 "action": "Submitted", "actor": f"{base}/users/554433", "object": assessment,
                 "generated": {"id": attempt, "type": "Attempt", "assignee": f"{base}/users/554433", "count": 1},
                 "eventTime": "2026-11-15T10:55:12.000Z"}
    return {"sensor": f"{base}/sensors/js", "sendTime": "2026-11-15T10:57:07.000+0000", "dataVersion": version,
            "data": [graded, submitted]}


async def test_what_a_javascript_sensor_sends_is_accepted_in_caliper_1p1(api, tokens):
    reply = await api.post("/caliper", content=orjson.dumps(javascript_sensor_envelope(CALIPER_V1P1)),
                           headers=headers(tokens["sensor"]))
    assert reply.status_code == 200, reply.text
    # 1.2's conformance fixtures call a whole-number score malformed: refused there, unless a site allows it
    refused = assert_problem(await api.post("/caliper", content=orjson.dumps(javascript_sensor_envelope(CALIPER_V1P2)),
                                            headers=headers(tokens["sensor"])), 400)
    assert {e["path"] for e in refused["errors"]} == {'$.data[0].generated.maxScore', '$.data[0].generated.scoreGiven'}


def test_whole_number_decimals_in_caliper_1p2_when_the_setting_allows_them():
    from lap.caliper import CaliperError, parse_envelope

    body = orjson.dumps(javascript_sensor_envelope(CALIPER_V1P2))
    with pytest.raises(CaliperError):
        parse_envelope(body)
    envelope_ = parse_envelope(body, whole_numbers=True)  # caliper.whole_number_decimals_v1p2: true
    assert [item.type for item in envelope_.items] == ["GradeEvent", "AssessmentEvent"]


async def test_all_problems_of_an_envelope_are_listed(api, tokens):
    events = fresh_events(5)
    events[1]["action"] = "Exploded"                    # not a Caliper action
    events[3]["eventTime"] = "yesterday"
    events[4]["colour"] = "blue"                        # unknown property outside extensions
    reply = await api.post("/caliper", content=orjson.dumps(envelope(events)), headers=headers(tokens["sensor"]))
    body = assert_problem(reply, 400)
    assert {e["index"] for e in body["errors"]} == {1, 3, 4}
    assert any(e["path"].startswith("$.data[3].eventTime") for e in body["errors"])


@pytest.mark.parametrize("content,status", [
    (b"", 400),
    (b"not json", 400),
    (b"[1, 2, 3]", 400),
    (b'{"sensor": "x"}', 400),
    (orjson.dumps(envelope([])), 400),
    (orjson.dumps({**envelope([]), "data": "nope"}), 400),
    (orjson.dumps(envelope([{"id": "x"}], data_version="http://purl.imsglobal.org/ctx/caliper/v9")), 422),
])
async def test_malformed_envelopes_get_400_and_unknown_versions_422(api, tokens, content, status):
    reply = await api.post("/caliper", content=content, headers=headers(tokens["sensor"]))
    assert_problem(reply, status)


@pytest.mark.parametrize("auth", [None, "Basic dXNlcjpwYXNz", "Bearer", "Bearer lap_000000000000_unknown",
                                  "Bearer not-a-lap-token"])
async def test_missing_or_unknown_credentials_get_401(api, auth):
    hdrs = {"Content-Type": "application/json"}
    if auth:
        hdrs["Authorization"] = auth
    reply = await api.post("/caliper", content=orjson.dumps(envelope(fresh_events(1))), headers=hdrs)
    assert_problem(reply, 401)
    assert reply.headers["www-authenticate"].startswith("Bearer")


async def test_reader_keys_and_other_sensors_cannot_send(api, tokens):
    """A valid key that may not send gets 403, as on /v1; only an unknown or missing key gets 401."""
    body = orjson.dumps(envelope(fresh_events(1)))
    refused = assert_problem(await api.post("/caliper", content=body, headers=headers(tokens["reader"])), 403)
    assert "reader keys cannot send events" in refused["detail"]
    assert_problem(await api.get("/caliper", headers=headers(tokens["reader"])), 403)
    # A key bound to one sensor IRI cannot send for another.
    assert_problem(await api.post("/caliper", content=body, headers=headers(tokens["bound"])), 403)
    bound = orjson.dumps(envelope(fresh_events(1), sensor="https://example.edu/sensors/bound"))
    assert (await api.post("/caliper", content=bound, headers=headers(tokens["bound"]))).status_code == 200


async def test_a_revoked_key_stops_working(api, lap_up, db):
    from lap.auth import create_key, revoke_key

    key_id, token = await create_key(db, "acme", "sensor")
    body = orjson.dumps(envelope(fresh_events(1)))
    assert (await api.post("/caliper", content=body, headers=headers(token))).status_code == 200
    await revoke_key(db, key_id)
    await asyncio.sleep(lap_up.settings.auth.key_cache_ttl_s + 0.2)
    assert_problem(await api.post("/caliper", content=orjson.dumps(envelope(fresh_events(1))),
                                  headers=headers(token)), 401)


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "", "multipart/form-data"])
async def test_other_content_types_get_415(api, tokens, content_type):
    reply = await api.post("/caliper", content=orjson.dumps(envelope(fresh_events(1))),
                           headers={"Authorization": f"Bearer {tokens['sensor']}", "Content-Type": content_type})
    assert_problem(reply, 415)


async def test_unknown_content_encoding_gets_415_and_broken_gzip_400(api, tokens):
    body = orjson.dumps(envelope(fresh_events(1)))
    assert_problem(await api.post("/caliper", content=body,
                                  headers=headers(tokens["sensor"], **{"Content-Encoding": "br"})), 415)
    assert_problem(await api.post("/caliper", content=b"\x1f\x8b\x08garbage",
                                  headers=headers(tokens["sensor"], **{"Content-Encoding": "gzip"})), 400)
    truncated = gzip.compress(body)[:-12]
    assert_problem(await api.post("/caliper", content=truncated,
                                  headers=headers(tokens["sensor"], **{"Content-Encoding": "gzip"})), 400)


async def test_gzip_members_are_read_in_turn_and_trailing_bytes_refused(api, tokens):
    body = orjson.dumps(envelope(fresh_events(3)))
    two_members = gzip.compress(body[:40]) + gzip.compress(body[40:])  # RFC 1952: one stream of several members
    reply = await api.post("/caliper", content=two_members,
                           headers=headers(tokens["sensor"], **{"Content-Encoding": "gzip"}))
    assert reply.status_code == 200, reply.text
    trailing = gzip.compress(orjson.dumps(envelope(fresh_events(1)))) + b"garbage"
    refused = assert_problem(await api.post("/caliper", content=trailing,
                                            headers=headers(tokens["sensor"], **{"Content-Encoding": "gzip"})), 400)
    assert "7 bytes that are not gzip" in refused["detail"]


async def test_items_nested_too_deep_to_store_get_400_and_are_quarantined(api, tokens, db):
    sensor = f"https://example.edu/sensors/{uuid.uuid4().hex[:8]}"
    for depth in (253, 600, 1000):  # orjson reads up to 1,024 levels, but writes only ~254
        events = fresh_events(2)
        events[1]["extensions"] = {"deep": "PLACEHOLDER"}
        payload = orjson.dumps(envelope(events, sensor=sensor)).replace(
            b'"PLACEHOLDER"', b'{"a":' * depth + b"1" + b"}" * depth)
        body = assert_problem(await api.post("/caliper", content=payload, headers=headers(tokens["sensor"])), 400)
        assert [(e["index"], "levels deep" in e["message"]) for e in body["errors"]] == [(1, True)]
    for _ in range(50):
        count = await db.fetchval("SELECT count FROM quarantine_counts WHERE tenant = 'acme' AND sensor = $1 "
                                  "AND status = 400", sensor)
        if count == 3:
            break
        await asyncio.sleep(0.2)
    assert count == 3


async def test_a_slow_client_with_an_oversized_body_reads_its_413(settings, tokens):
    """The body is sent in small pieces after a Content-Length over the limit: the 413 must arrive whole, not as a
    connection reset while the client is still writing."""
    limit = settings.limits.max_body_bytes
    size = limit + limit // 2
    reader, writer = await asyncio.open_connection("127.0.0.1", settings.ray.http_port)
    try:
        writer.write(f"POST /caliper HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tokens['sensor']}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode())
        piece = b" " * 65536
        sent = 0
        while sent < size:
            chunk = piece[:size - sent]
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
            await asyncio.sleep(0.005)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 413"), head
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        problem = orjson.loads(await asyncio.wait_for(reader.readexactly(length), 30))
    finally:
        writer.close()
    assert problem["status"] == 413 and str(limit) in problem["detail"]


async def test_oversized_bodies_and_records_get_413(api, settings, tokens):
    limit = settings.limits.max_body_bytes
    events = fresh_events(1)
    events[0]["extensions"] = {"padding": "x" * (limit + 10)}
    too_big = orjson.dumps(envelope(events))
    assert_problem(await api.post("/caliper", content=too_big, headers=headers(tokens["sensor"])), 413)
    # A small gzip that inflates past the limit.
    bomb = gzip.compress(b" " * (limit + 1000))
    assert_problem(await api.post("/caliper", content=bomb,
                                  headers=headers(tokens["sensor"], **{"Content-Encoding": "gzip"})), 413)
    # One event over the record limit even compressed, in an envelope under the body limit.
    events = fresh_events(3)
    events[2]["extensions"] = {"noise": os.urandom(settings.limits.max_record_bytes).hex()}
    body = assert_problem(await api.post("/caliper", content=orjson.dumps(envelope(events)),
                                         headers=headers(tokens["sensor"])), 413)
    assert [e["index"] for e in body["errors"]] == [2]


async def test_rate_limit_gives_429_with_retry_after(api, tokens):
    body = orjson.dumps(envelope(fresh_events(1)))
    first = await api.post("/caliper", content=body, headers=headers(tokens["slow"]))
    replies = [first] + [await api.post("/caliper", content=orjson.dumps(envelope(fresh_events(1))),
                                        headers=headers(tokens["slow"])) for _ in range(3)]
    limited = [r for r in replies if r.status_code == 429]
    assert limited, [r.status_code for r in replies]
    assert int(limited[0].headers["retry-after"]) >= 1
    assert_problem(limited[0], 429)
    # Other keys are not affected.
    assert (await api.post("/caliper", content=body, headers=headers(tokens["sensor"]))).status_code == 200


async def test_refused_envelopes_are_quarantined(api, settings, tokens, db):
    events = fresh_events(2)
    events[1]["action"] = "Exploded"
    sensor = f"https://example.edu/sensors/{uuid.uuid4().hex[:8]}"
    payload = orjson.dumps(envelope(events, sensor=sensor))
    reply = await api.post("/caliper", content=payload, headers=headers(tokens["sensor"]))
    request_id = assert_problem(reply, 400)["request_id"]

    async with AsyncExitStack() as stack:
        s3 = await open_client(stack, settings, "s3")
        found = None
        for _ in range(50):
            listing = await s3.list_objects_v2(Bucket=settings.archive.bucket,
                                               Prefix=f"{settings.archive.quarantine_prefix}/tenant=acme/")
            found = next((o["Key"] for o in listing.get("Contents", []) if request_id in o["Key"]), None)
            if found:
                break
            await asyncio.sleep(0.2)
        assert found, "no quarantine object"
        doc = orjson.loads(await (await s3.get_object(Bucket=settings.archive.bucket, Key=found))["Body"].read())
    assert doc["status"] == 400 and doc["sensor"] == sensor and doc["tenant"] == "acme"
    assert orjson.loads(doc["payload"]) == orjson.loads(payload)
    assert doc["problems"][0]["index"] == 1
    for _ in range(50):
        count = await db.fetchval("SELECT count FROM quarantine_counts WHERE tenant = 'acme' AND sensor = $1 "
                                  "AND status = 400", sensor)
        if count:
            break
        await asyncio.sleep(0.2)
    assert count == 1


async def test_a_refused_request_does_not_disturb_accepted_ones(api, tokens):
    good = [orjson.dumps(envelope(fresh_events(20))) for _ in range(10)]
    bad = [b"{broken", orjson.dumps(envelope([{"type": "Nope"}]))] * 5
    replies = await asyncio.gather(*(api.post("/caliper", content=b, headers=headers(tokens["sensor"]))
                                     for pair in zip(good, bad) for b in pair))
    assert [r.status_code for r in replies[0::2]] == [200] * 10
    assert all(r.status_code == 400 for r in replies[1::2])


async def test_a_postgres_outage_gets_503_not_500(api, lap_up, tokens):
    """With Postgres frozen, a key that is not cached cannot be checked: a retriable 503, never a 500."""
    import signal

    from lap.auth import new_token

    import psutil

    postmaster = psutil.Process(lap_up.state["stand_ins"]["postgres"]["pid"])
    # The postmaster and every backend (each in its own session): pooled connections freeze too.
    frozen = [postmaster, *postmaster.children(recursive=True)]
    for proc in frozen:
        proc.send_signal(signal.SIGSTOP)
    try:
        _, unknown = new_token()
        reply = await api.post("/caliper", content=orjson.dumps(envelope(fresh_events(1))),
                               headers=headers(unknown), timeout=60)
        assert_problem(reply, 503)
        assert reply.headers["retry-after"]
    finally:
        for proc in frozen:
            proc.send_signal(signal.SIGCONT)
    reply = await api.post("/caliper", content=orjson.dumps(envelope(fresh_events(1))),
                           headers=headers(tokens["sensor"]))
    assert reply.status_code == 200, reply.text


async def test_endpoint_configuration(api, settings, tokens):
    assert_problem(await api.get("/caliper"), 401)
    reply = await api.get("/caliper", headers=headers(tokens["sensor"]))
    assert reply.status_code == 200
    config = reply.json()
    assert config["caliper_maximum_payload_size"] == settings.limits.max_body_bytes // 1024
    assert CALIPER_V1P1 in config["caliper_supported_versions"]
    assert CALIPER_V1P2 in config["caliper_supported_versions"]
    assert config["caliper_supported_extensions"]["endpoint_name"] == "LAP"
    assert set(config) == {"caliper_maximum_payload_size", "caliper_supported_versions",
                           "caliper_supported_extensions"}
