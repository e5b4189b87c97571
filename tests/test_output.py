"""The Output API on the session's LAP: figures equal to what was sent, paging, bad parameters, tenant isolation."""

from __future__ import annotations

import base64
import http.client
import json
from collections import Counter, defaultdict
import time
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.support.traffic import envelopes, expected_records, make_events, new_tenant, send, wait_for
from tests.support.api import get, key


@pytest.fixture(scope="module")
async def two_tenants(lap_up, settings):
    """Tenant A with events (drained and indexed), tenant B with other events; a reader key for each."""
    from lap.sinks.store import connect

    a, a_sensor = new_tenant(lap_up)
    b, b_sensor = new_tenant(lap_up)
    a_events, b_events = make_events(400, learners=25, courses=3), make_events(100, learners=10, courses=2)
    send(settings, a_sensor, envelopes(a_events))
    send(settings, b_sensor, envelopes(b_events))
    conn = await connect(settings)
    try:
        await wait_for(conn, a, {"archived": 400, "indexed": 400}, timeout=180, settings=settings)
        await wait_for(conn, b, {"archived": 100, "indexed": 100}, timeout=180, settings=settings)
    finally:
        await conn.close()
    return {"a": a, "b": b, "a_events": a_events, "b_events": b_events,
            "a_reader": key(lap_up, a, "reader"), "b_reader": key(lap_up, b, "reader"), "a_sensor": a_sensor}


def test_learner_summary_matches_what_was_sent(settings, two_tenants):
    records = expected_records(two_tenants["a"], two_tenants["a_events"])
    learner = Counter(r["meta"]["learner"] for r in records).most_common(1)[0][0]
    mine = [r for r in records if r["meta"]["learner"] == learner]
    reply = get(settings, two_tenants["a_reader"], "/learner-summary", learner=learner)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    courses = {c["course"]: c for c in body["courses"]}
    by_course: dict = defaultdict(list)
    for r in mine:
        by_course[r["meta"]["course"]].append(r)
    assert set(courses) == set(by_course)
    for course, rs in by_course.items():
        figures = courses[course]
        assert figures["events"] == len(rs)
        assert figures["actions"] == dict(Counter(r["meta"]["action"] for r in rs))
        assert figures["submissions"] == sum(1 for r in rs if r["meta"]["type"] == "AssessmentEvent"
                                             and r["meta"]["action"] == "Submitted")
        graded = [r["item"]["generated"]["scoreGiven"] for r in rs
                  if r["meta"]["type"] == "GradeEvent" and r["meta"]["action"] == "Graded"
                  and isinstance(r["item"].get("generated"), dict) and "scoreGiven" in r["item"]["generated"]]
        assert figures["scores"]["count"] == len(graded)
        if graded:
            assert figures["scores"]["max"] == max(graded)
            assert figures["scores"]["mean"] == pytest.approx(sum(graded) / len(graded))
    one = next(c for c in by_course if c)
    only = get(settings, two_tenants["a_reader"], "/learner-summary", learner=learner, course=one).json()
    assert [c["course"] for c in only["courses"]] == [one]


def test_course_learners_pages_through_every_learner_once(settings, two_tenants):
    records = expected_records(two_tenants["a"], two_tenants["a_events"])
    course = Counter(r["meta"]["course"] for r in records if r["meta"]["course"]).most_common(1)[0][0]
    expected = Counter(r["meta"]["learner"] for r in records if r["meta"]["course"] == course)
    for sort in ("-events", "learner", "score_mean", "-last_active"):
        seen, cursor = [], None
        for _ in range(50):
            params = {"course": course, "limit": 4, "sort": sort} | ({"cursor": cursor} if cursor else {})
            reply = get(settings, two_tenants["a_reader"], "/course-learners", **params)
            assert reply.status_code == 200, reply.text
            body = reply.json()
            seen += body["learners"]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert Counter(r["learner"] for r in seen) == Counter(set(expected)), sort
        assert {r["learner"]: r["events"] for r in seen} == dict(expected)
        if sort == "-events":
            assert [r["events"] for r in seen] == sorted((r["events"] for r in seen), reverse=True)


def test_event_search_pages_and_filters(settings, two_tenants):
    events = two_tenants["a_events"]
    seen, cursor = [], None
    for _ in range(20):
        params = {"limit": 50} | ({"cursor": cursor} if cursor else {})
        body = get(settings, two_tenants["a_reader"], "/events", **params).json()
        seen += [e["event_id"] for e in body["events"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(e["id"] for e in events)
    kind = events[0]["type"]
    typed = get(settings, two_tenants["a_reader"], "/events", type=kind, limit=1000).json()["events"]
    assert {e["event_id"] for e in typed} == {e["id"] for e in events if e["type"] == kind}
    one = get(settings, two_tenants["a_reader"], f"/events/{events[0]['id']}")
    assert one.status_code == 200 and one.json()["event"] == events[0]  # whole, read from the archive


def test_no_route_shows_another_tenants_data(settings, two_tenants):
    b_reader = two_tenants["b_reader"]
    a_records = expected_records(two_tenants["a"], two_tenants["a_events"])
    b_records = expected_records(two_tenants["b"], two_tenants["b_events"])
    # both tenants' sensors use the same LMS, so IRIs can exist in both: pick A's that B never sent
    b_iris = {r["meta"]["learner"] for r in b_records} | {r["item"]["actor"]["id"] for r in b_records}
    a_learner = next(r["meta"]["learner"] for r in a_records if r["meta"]["learner"] not in b_iris)
    a_actor = next(r["item"]["actor"]["id"] for r in a_records if r["item"]["actor"]["id"] not in b_iris)
    a_course = next(r["meta"]["course"] for r in a_records if r["meta"]["course"])
    a_event = two_tenants["a_events"][0]["id"]
    # tenant B's own data is there ...
    assert get(settings, b_reader, "/events", limit=1).json()["events"]
    # ... and none of A's, whatever the parameters
    assert get(settings, b_reader, "/learner-summary", learner=a_learner).status_code == 404
    assert get(settings, two_tenants["a_reader"], "/learner-summary", learner=a_learner).status_code == 200
    # a course IRI both tenants use: B sees only its own learners there
    b_learners = Counter(r["meta"]["learner"] for r in b_records if r["meta"]["course"] == a_course)
    rows = get(settings, b_reader, "/course-learners", course=a_course, limit=1000).json()["learners"]
    assert {r["learner"]: r["events"] for r in rows} == dict(b_learners)
    assert get(settings, b_reader, f"/events/{a_event}").status_code == 404
    assert get(settings, b_reader, "/events", actor=a_actor).json()["events"] == []
    assert get(settings, two_tenants["a_reader"], "/events", actor=a_actor).json()["events"]
    found = get(settings, b_reader, "/events", limit=1000).json()["events"]
    assert not {e["event_id"] for e in found} & {e["id"] for e in two_tenants["a_events"]}


def _cursor(values: str) -> str:
    return base64.urlsafe_b64encode(values.encode()).decode().rstrip("=")


@pytest.mark.parametrize("path,params,status", [
    ("/learner-summary", {}, 400),
    ("/events", {"cursor": _cursor('["x","x"]')}, 400),  # well formed, but not the sort values of a hit
    ("/events", {"cursor": _cursor("[null,null]")}, 400),
    ("/events", {"cursor": _cursor('[{"a":1},"x"]')}, 400),
    ("/events/", {}, 400),  # no id
    ("/events", {"sensor": "\x00"}, 400),
    ("/learner-summary", {"learner": "a\x00b"}, 400),
    ("/course-learners", {"course": "x", "sort": "nope"}, 400),
    ("/course-learners", {"course": "x", "limit": 0}, 400),
    ("/course-learners", {"course": "x", "limit": 100000}, 400),
    ("/course-learners", {"course": "x", "cursor": "not-a-cursor"}, 400),
    ("/course-learners", {"course": "x", "sort": "last_active", "cursor": "WzEsImEiXQ"}, 400),
    ("/events", {"start": "2026-10-02T00:00:00Z", "end": "2026-10-01T00:00:00Z"}, 400),
    ("/events", {"start": "yesterday"}, 400),
    ("/events", {"cursor": "%%%"}, 400),
    ("/events", {"start": "2026-10-02T00:00:00", "end": "2026-10-01T00:00:00Z"}, 400),  # naive start is UTC
    ("/course-learners", {"course": "x", "cursor": "WzFlMzAsImEiXQ"}, 400),  # a tampered cursor: [1e30, "a"]
    ("/events", {"actor": "https://example.edu/" + "a" * 5000}, 414),  # over MAX_QUERY_BYTES
])
def test_bad_parameters_get_a_clear_4xx(settings, two_tenants, path, params, status):
    reply = get(settings, two_tenants["a_reader"], path, **params)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")
    assert reply.json()["detail"]
    assert "$" not in reply.json()["detail"] and "datetime." not in reply.json()["detail"]  # no internals


def _long_query(settings, token: str, size: int) -> tuple[int, str, bytes]:
    url = httpx.URL(settings.api_url)
    connection = http.client.HTTPConnection(url.host, url.port, timeout=30)  # httpx refuses URLs this long
    try:
        connection.request("GET", "/v1/events?actor=" + "a" * size, headers={"Authorization": f"Bearer {token}"})
        reply = connection.getresponse()
        return reply.status, reply.getheader("content-type") or "", reply.read()
    finally:
        connection.close()


def test_a_long_query_string_gets_the_same_414_problem_from_lap_or_from_its_proxy(settings, two_tenants):
    """5 KB reaches LAP; 100 KB would be too long for a replica's HTTP parser, so Serve's HAProxy answers it
    with LAP's own problem (lap.runner.haproxy_wrapper)."""
    token = two_tenants["a_reader"]
    by_lap = _long_query(settings, token, 5_000)
    by_proxy = _long_query(settings, token, 100_000)
    assert by_lap[:2] == by_proxy[:2] == (414, "application/problem+json"), (by_lap, by_proxy[:2])
    assert json.loads(by_lap[2])["detail"] == json.loads(by_proxy[2])["detail"]
    # past HAProxy's 128 KiB buffer it answers with its own HTML 400: still a 4xx (docs/analysts.md)
    status, _, _ = _long_query(settings, token, 200_000)
    assert status == 400


def test_keys_and_roles(settings, two_tenants):
    missing = get(settings, None, "/events")
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert get(settings, "lap_nope_nope", "/events").status_code == 401
    assert get(settings, two_tenants["a_sensor"], "/events").status_code == 403  # a sensor key cannot read


def _course_events(two_tenants):
    records = expected_records(two_tenants["a"], two_tenants["a_events"])
    course = Counter(r["meta"]["course"] for r in records if r["meta"]["course"]).most_common(1)[0][0]
    return course, [r for r in records if r["meta"]["course"] == course]


SPAN = {"start": "2026-08-31T00:00:00Z", "end": "2026-09-06T00:00:00Z"}


@pytest.mark.parametrize("granularity,width", [("day", 10), ("hour", 13)])
def test_course_activity_per_day_and_hour(settings, two_tenants, granularity, width):
    course, records = _course_events(two_tenants)
    events: Counter = Counter()
    learners: dict = defaultdict(set)
    for r in records:
        bucket = r["meta"]["event_time"][:width]  # "YYYY-MM-DD" or "YYYY-MM-DDTHH"
        events[bucket] += 1
        learners[bucket].add(r["meta"]["learner"])
    reply = get(settings, two_tenants["a_reader"], "/course-activity", course=course, granularity=granularity, **SPAN)
    assert reply.status_code == 200, reply.text
    buckets = {b["start"][:width]: b for b in reply.json()["buckets"]}
    assert {k: b["events"] for k, b in buckets.items()} == dict(events)
    assert {k: b["active_learners"] for k, b in buckets.items()} == {k: len(v) for k, v in learners.items()}


def test_windows_with_offsets_beyond_18_hours_mean_the_same_instants(settings, two_tenants):
    """Python and FastAPI take offsets up to 23:59, OpenSearch only to 18:00: LAP asks it in UTC."""
    course, records = _course_events(two_tenants)
    far = {"start": "2026-09-01T18:01:00+18:01", "end": "2026-09-02T00:00:00-23:59"}
    utc = {"start": "2026-09-01T00:00:00Z", "end": "2026-09-02T23:59:00Z"}
    inside = [r for r in records if utc["start"][:19] <= r["meta"]["event_time"][:19] < utc["end"][:19]]
    assert inside
    for route, params in (("/events", {"group": course, "limit": 1000}),
                          ("/course-activity", {"course": course, "granularity": "hour"})):
        replies = [get(settings, two_tenants["a_reader"], route, **params, **window) for window in (far, utc)]
        assert [r.status_code for r in replies] == [200, 200], replies[0].text
        assert replies[0].json() == replies[1].json()
    events = get(settings, two_tenants["a_reader"], "/events", group=course, limit=1000, **far).json()["events"]
    assert sorted(e["event_id"] for e in events) == sorted(r["meta"]["event_id"] for r in inside)


def week_of(records: list[dict]) -> list[int]:
    """Events per hour of the week, Monday 00-01 UTC first."""
    week = [0] * 168
    for r in records:
        moment = datetime.fromisoformat(r["meta"]["event_time"])
        week[moment.weekday() * 24 + moment.hour] += 1
    return week


def test_course_heatmap(settings, two_tenants):
    course, records = _course_events(two_tenants)
    cells: Counter = Counter((r["meta"]["learner"], r["meta"]["event_time"][:10]) for r in records)
    body = get(settings, two_tenants["a_reader"], "/course-heatmap", course=course, **SPAN).json()
    got = {(row["learner"], day): n for row in body["learners"] for day, n in row["days"].items()}
    assert got == dict(cells)
    assert body["days"] == sorted({day for _, day in cells})
    assert body["hour_of_week"] == week_of(records)
    # the same counts, labelled: a client draws them without knowing the flat layout
    assert [d["weekday"] for d in body["week"]] == ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                                                    "Saturday", "Sunday"]
    assert [n for d in body["week"] for n in d["hours"]] == body["hour_of_week"]
    assert all(len(d["hours"]) == 24 for d in body["week"])
    # a window cut mid-day holds the days that start inside it, in the cells and in the hours alike
    first, last = date.fromisoformat(body["days"][0]), date.fromisoformat(body["days"][2])
    narrow = {"start": f"{first}T06:00:00Z", "end": f"{last}T23:00:00Z"}
    inside = [r for r in records if first < date.fromisoformat(r["meta"]["event_time"][:10]) <= last]
    cut = get(settings, two_tenants["a_reader"], "/course-heatmap", course=course, **narrow).json()
    assert cut["days"] == sorted({r["meta"]["event_time"][:10] for r in inside})
    assert cut["hour_of_week"] == week_of(inside) and 0 < len(inside) < len(records)
    # the other tenant sees only its own events of this course IRI
    b_records = [r for r in expected_records(two_tenants["b"], two_tenants["b_events"]) if r["meta"]["course"] == course]
    other = get(settings, two_tenants["b_reader"], "/course-heatmap", course=course, **SPAN).json()
    assert sum(n for row in other["learners"] for n in row["days"].values()) == len(b_records)
    assert sum(other["hour_of_week"]) == len(b_records)


# --- generated requests --------------------------------------------------------------


def test_openapi_generated_requests_get_a_2xx_or_a_problem(settings, two_tenants):
    """Requests built by schemathesis from the Output API's own OpenAPI schema, for every route."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings as hsettings

    schema = schemathesis.openapi.from_url(f"{settings.api_url}/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "GET /events", "GET /learner-summary", "GET /audit/reconcile", "POST /audit/replay"}
    # a reader key: every route runs its validation, and a replay (admin only) is never started by chance
    auth = {"Authorization": f"Bearer {two_tenants['a_reader']}"}
    statuses: Counter = Counter()
    for operation in operations:
        @hsettings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case):
            reply = case.call(base_url=f"{settings.api_url}/v1", headers=auth)
            statuses[reply.status_code] += 1
            assert reply.status_code < 500, (case.method, case.path, reply.status_code, reply.text[:300])
            if reply.status_code >= 400:
                content_type = reply.headers["content-type"]  # schemathesis lists each header's values
                assert content_type[0].startswith("application/problem+json"), reply.text[:300]
                assert reply.json()["detail"]

        check()
    assert statuses[200] > 0 and statuses[400] > 0, statuses


def test_random_cursors_and_windows_get_a_2xx_or_a_400(settings, two_tenants):
    from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=8,
    )
    cursors = st.one_of(
        json_values.map(lambda value: _cursor(json.dumps(value))),  # well-formed base64 of any JSON
        st.text(max_size=40),  # anything at all
    )
    moments = st.one_of(
        st.datetimes(timezones=st.timezones() | st.just(None)).map(lambda moment: moment.isoformat()),
        st.text(max_size=30),
    )
    reader = two_tenants["a_reader"]
    course = two_tenants["a_events"][0].get("group", {}).get("id", "https://example.edu/courses/1")
    seen: Counter = Counter()

    @hsettings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(cursor=cursors, start=moments, end=moments, route=st.sampled_from(["events", "learners", "reconcile"]))
    def check(cursor, start, end, route):
        if route == "events":
            reply = get(settings, reader, "/events", cursor=cursor, start=start, end=end, limit=5)
        elif route == "learners":
            reply = get(settings, reader, "/course-learners", course=course, cursor=cursor, sort="-score_mean")
        else:
            reply = get(settings, reader, "/audit/reconcile", start=start, end=end)
        seen[reply.status_code] += 1
        assert reply.status_code in (200, 400), (route, cursor, start, end, reply.status_code, reply.text[:300])
        if reply.status_code == 400:
            assert reply.headers["content-type"].startswith("application/problem+json")
            assert "Traceback" not in reply.text and "datetime." not in reply.text

    check()
    assert seen[400] > 0
    # a real cursor of each kind still works after all that
    first = get(settings, reader, "/events", limit=1).json()
    assert first["next_cursor"] and get(settings, reader, "/events", limit=1, cursor=first["next_cursor"]).status_code == 200


@pytest.mark.parametrize("path", ["/openapi.json", "/v1/openapi.json"])
def test_the_openapi_schemas_declare_the_bearer_key(settings, path):
    """So that the docs page's "Authorize" and generated clients send the key."""
    schema = httpx.get(f"{settings.api_url}{path}", timeout=30).json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["bearer"]["description"]}
    secured = {(p, m) for p, ops in schema["paths"].items() for m, op in ops.items() if op.get("security")}
    everything = {(p, m) for p, ops in schema["paths"].items() for m in ops}
    assert everything - secured == {("/healthz", "get")}, everything - secured


def _all_pages(settings, token: str, path: str, field: str, **params) -> list[dict]:
    found, cursor = [], None
    for _ in range(100):
        body = get(settings, token, path, **params, **({"cursor": cursor} if cursor else {})).json()
        found += body[field]
        cursor = body["next_cursor"]
        if cursor is None:
            return found
    raise AssertionError("more than 100 pages")


def test_courses_and_learners_can_be_found_without_knowing_their_iris(settings, two_tenants):
    records = expected_records(two_tenants["a"], two_tenants["a_events"])
    courses = Counter(r["meta"]["course"] for r in records if r["meta"]["course"])
    learners = Counter(r["meta"]["learner"] for r in records)
    learner_courses = defaultdict(set)
    for r in records:
        if r["meta"]["course"]:
            learner_courses[r["meta"]["learner"]].add(r["meta"]["course"])
    listed = _all_pages(settings, two_tenants["a_reader"], "/courses", "courses", limit=2)
    assert [c["course"] for c in listed] == sorted(courses)  # by IRI, each once across the pages
    assert {c["course"]: c["events"] for c in listed} == dict(courses)
    people = _all_pages(settings, two_tenants["a_reader"], "/learners", "learners", limit=7)
    assert [p["learner"] for p in people] == sorted(learners)
    assert {p["learner"]: p["events"] for p in people} == dict(learners)
    assert {p["learner"]: p["courses"] for p in people} == {k: len(learner_courses[k]) for k in learners}
    # search: any part of the IRI, in any case
    one = sorted(courses)[1]
    part = one[len(one) // 2:].upper()
    found = get(settings, two_tenants["a_reader"], "/courses", q=part).json()["courses"]
    assert [c["course"] for c in found] == sorted(c for c in courses if part.lower() in c.lower())
    # the other tenant's reader finds only its own
    b_records = expected_records(two_tenants["b"], two_tenants["b_events"])
    b_listed = _all_pages(settings, two_tenants["b_reader"], "/courses", "courses")
    assert {c["course"]: c["events"] for c in b_listed} == dict(
        Counter(r["meta"]["course"] for r in b_records if r["meta"]["course"]))
    b_people = _all_pages(settings, two_tenants["b_reader"], "/learners", "learners")
    assert sum(p["events"] for p in b_people) == len(b_records)


def test_a_courses_learners_and_hourly_reconcile_export_as_csv(settings, two_tenants):
    import csv
    import io
    from datetime import timedelta, timezone

    course, records = _course_events(two_tenants)
    reply = get(settings, two_tenants["a_reader"], "/course-learners", course=course, format="csv", sort="learner")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/csv")
    assert "attachment" in reply.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(reply.text)))
    assert {r["learner"]: int(r["events"]) for r in rows} == dict(Counter(r["meta"]["learner"] for r in records))
    assert [r["learner"] for r in rows] == sorted(r["learner"] for r in rows)  # every learner, no paging
    # searching the table
    some = rows[0]["learner"]
    part = some[-4:].upper()
    hits = get(settings, two_tenants["a_reader"], "/course-learners", course=course, q=part).json()["learners"]
    assert {h["learner"] for h in hits} == {r["learner"] for r in rows if part.lower() in r["learner"].lower()}

    now = datetime.now(timezone.utc)
    window = {"start": (now - timedelta(hours=6)).isoformat(), "end": (now + timedelta(hours=1)).isoformat()}
    hours = get(settings, two_tenants["a_reader"], "/audit/hours", **window).json()["hours"]
    assert len(hours) == 8 and all(h["complete"] for h in hours), hours
    assert sum(h["accepted"] for h in hours) == sum(h["archived"] for h in hours) == len(two_tenants["a_events"])
    table = list(csv.DictReader(io.StringIO(
        get(settings, two_tenants["a_reader"], "/audit/hours", **window, format="csv").text)))
    assert [int(r["accepted"]) for r in table] == [h["accepted"] for h in hours]
    assert [int(r["missing_index"]) for r in table] == [h["missing"]["index"] for h in hours]
    assert get(settings, two_tenants["a_reader"], "/audit/hours", start=window["start"],
               end=(now + timedelta(days=8)).isoformat()).status_code == 400


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_the_docs_pages_load_nothing_from_another_host(settings, prefix):
    import re

    page = httpx.get(f"{settings.api_url}{prefix}/docs", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    links = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?['"]([^'"]+)['"]""", page.text)
    urls = [a or b for a, b in links]
    assert urls and all(u.startswith(f"{prefix}/") for u in urls), urls  # this host only, under the app's prefix
    assert not re.search(r"https?://(?!127\.0\.0\.1)", page.text.replace(settings.api_url, "")), "an outside host"
    for url in urls:
        reply = httpx.get(f"{settings.api_url}{url}", timeout=30)
        assert reply.status_code == 200, url
        if url.endswith(".js"):
            assert "javascript" in reply.headers["content-type"] and len(reply.content) > 100_000
        if url.endswith("openapi.json"):
            assert reply.json()["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert httpx.get(f"{settings.api_url}{prefix}/docs-assets/../../etc/passwd", timeout=30).status_code == 404
    assert httpx.get(f"{settings.api_url}{prefix}/redoc", timeout=30).status_code == 404


# --- time zones -----------------------------------------------------------------------


KOLKATA = ZoneInfo("Asia/Kolkata")  # +05:30 all year: its hours start at half past UTC hours


def _local(record: dict) -> datetime:
    return datetime.fromisoformat(record["meta"]["event_time"]).astimezone(KOLKATA)


def test_days_and_hours_are_read_in_the_time_zone_asked_for(settings, two_tenants):
    course, records = _course_events(two_tenants)
    reader = two_tenants["a_reader"]
    # days of the zone: the window's whole local days (its start, 00:00 UTC, is 05:30 there: that day is left out)
    first_day = date(2026, 8, 31) + timedelta(days=1)
    in_days = [r for r in records if _local(r).date() >= first_day]
    days = get(settings, reader, "/course-activity", course=course, granularity="day", tz="Asia/Kolkata", **SPAN)
    assert days.status_code == 200, days.text
    assert {b["start"]: b["events"] for b in days.json()["buckets"]} == \
        {f"{d}T00:00:00+05:30": n for d, n in Counter(_local(r).date() for r in in_days).items()}
    hours = get(settings, reader, "/course-activity", course=course, granularity="hour", tz="Asia/Kolkata", **SPAN)
    assert {b["start"]: b["events"] for b in hours.json()["buckets"]} == \
        {h.isoformat(): n for h, n in Counter(_local(r).replace(minute=0, second=0, microsecond=0)
                                               for r in records).items()}
    # the heat map's hours of the week, in the zone; its learner days stay UTC days. Hours are kept per UTC
    # hour: in a zone half an hour off, each counts in the local hour it starts in
    heat = get(settings, reader, "/course-heatmap", course=course, tz="Asia/Kolkata", **SPAN).json()
    week = [0] * 168
    first_midnight = datetime(2026, 9, 1, tzinfo=KOLKATA)
    for r in records:
        hour = datetime.fromisoformat(r["meta"]["event_time"]).replace(minute=0, second=0, microsecond=0)
        if hour >= first_midnight:
            week[hour.astimezone(KOLKATA).weekday() * 24 + hour.astimezone(KOLKATA).hour] += 1
    assert heat["time_zone"] == "Asia/Kolkata" and heat["hour_of_week"] == week
    assert heat["days"] == get(settings, reader, "/course-heatmap", course=course, **SPAN).json()["days"]
    # the proof's rows are the zone's whole hours, and hold every event once
    now = datetime.now(UTC)
    window = {"start": (now - timedelta(hours=3)).isoformat(), "end": (now + timedelta(minutes=1)).isoformat()}
    local = get(settings, reader, "/audit/hours", tz="Asia/Kolkata", **window).json()["hours"]
    utc = get(settings, reader, "/audit/hours", **window).json()["hours"]
    assert all(h["hour"].endswith(":00:00+05:30") for h in local)
    assert all(h["hour"].endswith(":00:00Z") for h in utc)
    assert sum(h["accepted"] for h in local) == sum(h["accepted"] for h in utc) == len(two_tenants["a_events"])
    for route, params in (("/course-activity", {"course": course, **SPAN}), ("/course-heatmap", {"course": course, **SPAN}),
                          ("/audit/hours", window)):
        for bad in ("Mars/Olympus_Mons", "../../etc/passwd", "Factory", "utc"):
            reply = get(settings, reader, route, tz=bad, **params)
            assert reply.status_code == 400 and "IANA time zone" in reply.json()["detail"], (route, bad, reply.text)


# --- what the console reads ------------------------------------------------------------


def test_whoami_and_the_pipeline_report(settings, two_tenants):
    assert get(settings, two_tenants["a_reader"], "/whoami").json() == {"tenant": two_tenants["a"], "role": "reader"}
    assert get(settings, two_tenants["a_sensor"], "/whoami").status_code == 403
    report = get(settings, two_tenants["a_reader"], "/pipeline", minutes=30).json()
    minutes = [datetime.fromisoformat(m["minute"]) for m in report["minutes"]]
    assert len(minutes) == 30 and all(b - a == timedelta(minutes=1) for a, b in zip(minutes, minutes[1:]))
    assert minutes[-1] <= datetime.fromisoformat(report["generated_at"]) < minutes[-1] + timedelta(minutes=1)
    assert sum(m["accepted"] for m in report["minutes"]) == len(two_tenants["a_events"])  # sent minutes ago
    shards = get(settings, two_tenants["a_reader"], "/audit/shards").json()
    assert [s["shard_id"] for s in report["shards"]] == [s["shard_id"] for s in shards]
    live = [s for s in report["shards"] if s["consumer"] == "consuming"]
    assert live and all(s["node"] == "127.0.0.1" and not s["stale"] and s["lag_ms"] is not None for s in live)
    assert set(report["components"]) == {"postgres", "kinesis", "s3", "opensearch"}
    other = get(settings, two_tenants["b_reader"], "/pipeline", minutes=30).json()
    assert sum(m["accepted"] for m in other["minutes"]) == len(two_tenants["b_events"])
    assert get(settings, two_tenants["a_reader"], "/pipeline", minutes=0).status_code == 400


def test_a_learners_activity_per_day_and_course(settings, two_tenants):
    records = expected_records(two_tenants["a"], two_tenants["a_events"])
    learner = Counter(r["meta"]["learner"] for r in records).most_common(1)[0][0]
    mine = [r for r in records if r["meta"]["learner"] == learner]
    body = get(settings, two_tenants["a_reader"], "/learner-activity", learner=learner, **SPAN).json()
    assert body["days"] == [str(date(2026, 8, 31) + timedelta(days=i)) for i in range(6)]
    expected: dict[str, list[int]] = {}
    for r in mine:
        day = body["days"].index(r["meta"]["event_time"][:10])
        expected.setdefault(r["meta"]["course"] or "", [0] * 6)[day] += 1  # "": events without a course
    assert body["courses"] == expected
    other = get(settings, two_tenants["b_reader"], "/learner-activity", learner=learner, **SPAN).json()
    assert sum(n for days in other["courses"].values() for n in days) == \
        sum(1 for r in expected_records(two_tenants["b"], two_tenants["b_events"]) if r["meta"]["learner"] == learner)


def test_refusals_by_sensor_and_reason_with_their_payload(settings, two_tenants):
    sensor = "https://example.edu/sensors/refusals-test"
    body = json.dumps({"sensor": sensor, "sendTime": "2026-12-01T00:00:00Z", "dataVersion": "nope", "data": []})
    started = datetime.now(UTC) - timedelta(seconds=1)
    for _ in range(2):
        reply = httpx.post(f"{settings.api_url}/caliper", content=body, timeout=30,
                           headers={"Authorization": f"Bearer {two_tenants['a_sensor']}",
                                    "Content-Type": "application/json"})
        assert reply.status_code in (400, 422), reply.text
    window = {"start": started.isoformat(), "end": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()}
    groups: list = []
    for _ in range(60):  # the quarantine is written in the background
        groups = get(settings, two_tenants["a_reader"], "/audit/refusals", **window).json()["groups"]
        if groups and groups[0]["count"] == 2:
            break
        time.sleep(0.5)
    assert [(g["sensor"], g["status"], g["count"]) for g in groups] == [(sensor, reply.status_code, 2)]
    assert groups[0]["sample_problems"]
    kept = get(settings, two_tenants["a_reader"], f"/audit/quarantine/{groups[0]['sample_request_id']}").json()
    assert kept["payload"] == body and kept["payload_encoding"] == "utf-8" and not kept["payload_truncated"]
    assert kept["problems"] == groups[0]["sample_problems"]
    # another tenant: none of it
    assert get(settings, two_tenants["b_reader"], "/audit/refusals", **window).json()["groups"] == []
    assert get(settings, two_tenants["b_reader"],
               f"/audit/quarantine/{groups[0]['sample_request_id']}").status_code == 404


def test_the_console_is_served_with_a_strict_policy(settings):
    page = httpx.get(f"{settings.api_url}/console/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for asset in ("console.js", "console.css"):
        assert httpx.get(f"{settings.api_url}/console/{asset}", timeout=30).status_code == 200
    assert "http" not in "".join(line for line in page.text.splitlines() if "src=" in line or "href=" in line)
    assert httpx.get(f"{settings.api_url}/console/nope.js", timeout=30).status_code == 404
    moved = httpx.get(f"{settings.api_url}/console", timeout=30)
    assert moved.status_code in (301, 307, 308) and moved.headers["location"].endswith("/console/")
