"""Random input against /caliper: always a 2xx or a 4xx, never a 5xx, and the service keeps working."""

from __future__ import annotations

import gzip

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from lap.samples import EventFactory, envelope

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(doc, prefix=()):
    """Every (container path, key) in a JSON document."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield prefix, key
            yield from _paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield prefix, i
            yield from _paths(value, prefix + (i,))


def _at(doc, path):
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def mutated_envelopes(draw):
    doc = envelope(EventFactory(seed=draw(st.integers(0, 10**6))).events(draw(st.integers(1, 4))))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        if not paths:
            break
        parent_path, key = draw(st.sampled_from(paths))
        parent = _at(doc, parent_path)
        how = draw(st.sampled_from(["replace", "delete", "add"]))
        if how == "replace":
            parent[key] = draw(JSON_VALUES)
        elif how == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = draw(JSON_VALUES)
        else:
            parent.append(draw(JSON_VALUES))
    body = orjson.dumps(doc)
    if draw(st.booleans()):  # sometimes damage the bytes themselves
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=8)) + body[cut + draw(st.integers(0, 4)):]
    return body


@pytest.fixture(scope="module")
def client(settings):
    with httpx.Client(base_url=settings.api_url, timeout=30) as c:
        yield c


def test_mutated_envelopes_never_get_a_5xx(client, tokens):
    auth = {"Authorization": f"Bearer {tokens['sensor']}", "Content-Type": "application/json"}
    seen: dict[int, int] = {}

    @hsettings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=mutated_envelopes(), gzipped=st.booleans())
    def check(body, gzipped):
        hdrs = dict(auth, **({"Content-Encoding": "gzip"} if gzipped else {}))
        reply = client.post("/caliper", content=gzip.compress(body) if gzipped else body, headers=hdrs)
        seen[reply.status_code] = seen.get(reply.status_code, 0) + 1
        assert reply.status_code in (200, 400, 413, 422), (reply.status_code, reply.text[:500])

    check()
    assert seen.get(400, 0) > 0  # the mutations did reach the validator
    # Numbers no 64-bit type holds, written straight into the bytes.
    event = EventFactory(seed=3).events(1)[0]
    event["extensions"] = {"big": 12345}
    huge = orjson.dumps(envelope([event])).replace(b'"big":12345', b'"big":' + b"9" * 40)
    assert b"9" * 40 in huge
    assert client.post("/caliper", content=huge, headers=auth).status_code in (200, 400)
    event["extensions"] = {}
    event["generated"] = {"id": "https://example.edu/attempts/1", "type": "Attempt", "count": 12345}
    huge = orjson.dumps(envelope([event])).replace(b'"count":12345', b'"count":' + b"9" * 40)
    assert client.post("/caliper", content=huge, headers=auth).status_code == 400
    # ...and the service still takes a valid envelope afterwards.
    fine = client.post("/caliper", content=orjson.dumps(envelope(EventFactory(seed=7).events(5))), headers=auth)
    assert fine.status_code == 200


def test_openapi_generated_requests_never_get_a_5xx(settings, tokens):
    """Requests built by schemathesis from the ingest API's own OpenAPI schema, for every operation."""
    schema = schemathesis.openapi.from_url(f"{settings.api_url}/openapi.json")
    auth = {"Authorization": f"Bearer {tokens['sensor']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /caliper", "GET /caliper", "GET /healthz"}
    statuses: dict[int, int] = {}

    for operation in operations:
        @hsettings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case):
            reply = case.call(base_url=settings.api_url, headers=auth)
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
            assert reply.status_code < 500, (case.method, case.path, reply.status_code, reply.text[:300])

        check()
    assert statuses.get(200, 0) > 0
