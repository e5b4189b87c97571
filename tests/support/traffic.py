"""Traffic for a test's own tenant, and what it should leave in each store: tenants, generated events,
sending, waiting until the pipeline drained, and the stores read back."""

from __future__ import annotations

import asyncio
import gzip
import random
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from contextlib import AsyncExitStack

import httpx
import orjson

from lap.aws import open_client
from lap.caliper import iri_of
from lap.process.aggregate import Aggregates, aggregate_python
from lap.process.coordinator import consumer_name
from lap.samples import EventFactory, envelope
from lap.sinks.index import index_name, open_opensearch
from tests.support.stack import run_lap


DRAIN_TIMEOUT_S = 120


# --- helpers -----------------------------------------------------------------------


def new_tenant(lap_up) -> tuple[str, str]:
    tenant = f"t{uuid.uuid4().hex[:10]}"
    token = run_lap("keys", "create", "--tenant", tenant, "--role", "sensor", config=lap_up.config).stdout.strip()
    return tenant, token


def make_events(n: int, learners: int = 60, courses: int = 8) -> list[dict]:
    factory = EventFactory(seed=random.randrange(1 << 30), learners=learners, courses=courses, days=3)
    events = factory.events(n)
    for i, event in enumerate(events):
        if i % 17 == 0:
            event.pop("group", None)  # some events have no course
    return events


def envelopes(events: list[dict], per: int = 50) -> list[bytes]:
    return [orjson.dumps(envelope(events[i:i + per])) for i in range(0, len(events), per)]


def send(settings, token: str, bodies: list[bytes], pause_s: float = 0.0) -> None:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with httpx.Client(timeout=60) as client:
        for body in bodies:
            reply = client.post(f"{settings.api_url}/caliper", content=body, headers=headers)
            assert reply.status_code == 200, reply.text
            if pause_s:
                time.sleep(pause_s)


def send_in_background(settings, token: str, bodies: list[bytes], pause_s: float) -> threading.Thread:
    errors: list[BaseException] = []

    def run():
        try:
            send(settings, token, bodies, pause_s)
        except BaseException as exc:  # surfaced by join_sender
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def join_sender(thread: threading.Thread) -> None:
    thread.join(300)
    assert not thread.is_alive(), "the sender did not finish"
    if thread.errors:  # type: ignore[attr-defined]
        raise thread.errors[0]  # type: ignore[attr-defined]


def expected_records(tenant: str, events: list[dict]) -> list[dict]:
    """What the pipeline should aggregate, derived here independently of the ingest code."""
    records = []
    for event in events:
        learner = iri_of(event["actor"])
        if event["type"] == "GradeEvent" and isinstance(event["object"], dict) and event["object"].get("assignee"):
            learner = iri_of(event["object"]["assignee"])
        group = event.get("group")
        meta = {"event_id": event["id"], "kind": "event", "type": event["type"], "action": event["action"],
                "tenant": tenant, "learner": learner, "course": None if group is None else iri_of(group),
                "event_time": event["eventTime"]}
        records.append({"meta": meta, "item": event})
    return records


async def stage_totals(db, tenant: str) -> dict[str, int]:
    rows = await db.fetch("SELECT stage, sum(events)::bigint AS n FROM stage_counts WHERE tenant = $1 GROUP BY stage",
                          tenant)
    return {r["stage"]: r["n"] for r in rows}


async def wait_for(db, tenant: str, want: dict[str, int], timeout: float = DRAIN_TIMEOUT_S,
                   settings=None) -> dict[str, int]:
    """Wait until the tenant's committed stage counts are `want`. With "indexed" in it, `settings` is needed: the
    documents the index writer committed are searchable after the index's next refresh, made here at once."""
    if "indexed" in want and settings is None:
        raise TypeError("wait_for(..., settings=...) for indexed events: the index is refreshed once they are")
    deadline = time.monotonic() + timeout
    totals: dict[str, int] = {}
    while time.monotonic() < deadline:
        totals = await stage_totals(db, tenant)
        if all(totals.get(stage, 0) == n for stage, n in want.items()):
            if "indexed" in want:  # committed by the index writer; searchable after the index's next refresh
                await refresh_index(settings, tenant)
            return totals
        await asyncio.sleep(0.5)
    raise AssertionError(f"tenant {tenant}: stages {totals} did not reach {want} within {timeout:.0f} s")


async def stored_aggregates(db, tenant: str) -> Aggregates:
    learner_days = await db.fetch(
        """SELECT tenant, learner, course, day, events, submissions, score_count, score_sum, score_max,
                  max_score_sum, time_on_task_s, first_active, last_active
             FROM learner_days WHERE tenant = $1""", tenant)
    actions = await db.fetch(
        "SELECT tenant, learner, course, day, action, count FROM learner_day_actions WHERE tenant = $1", tenant)
    course_days = await db.fetch("SELECT tenant, course, day, events FROM course_days WHERE tenant = $1", tenant)
    hours = await db.fetch(
        "SELECT tenant, course, hour, events FROM course_hours WHERE tenant = $1", tenant)
    return Aggregates.from_rows([tuple(r) for r in learner_days], [tuple(r) for r in actions],
                                [tuple(r) for r in course_days], [tuple(r) for r in hours])


async def archived_ids(settings, db, tenant: str) -> Counter:
    """Event ids in the tenant's committed archive objects, with how often each appears."""
    keys = [r["key"] for r in await db.fetch("SELECT key FROM archive_objects WHERE tenant = $1", tenant)]
    ids: Counter = Counter()
    async with AsyncExitStack() as stack:
        s3 = await open_client(stack, settings, "s3")
        for key in keys:
            reply = await s3.get_object(Bucket=settings.archive.bucket, Key=key)
            async with reply["Body"] as body:
                data = gzip.decompress(await body.read())
            for line in data.splitlines():
                record = orjson.loads(line)
                assert record["meta"]["tenant"] == tenant
                assert record["meta"]["shard_id"] and record["meta"]["sequence_number"]
                ids[record["meta"]["event_id"]] += 1
    return ids


async def receipts_of(settings, tenant: str, start: datetime, end: datetime | None = None):
    """The receipt objects the consumers wrote for the tenant's events received in [start, end)."""
    from lap.audit.reconcile import Reconciler, Window
    from lap.sinks.store import create_pool

    end = end or datetime.now(timezone.utc) + timedelta(minutes=1)
    pool = await create_pool(settings)
    try:
        async with AsyncExitStack() as stack:
            s3 = await open_client(stack, settings, "s3")
            return await Reconciler(settings, pool, s3, None).load_receipts(Window(tenant, start, end))
    finally:
        await pool.close()


async def assert_exact(settings, db, tenant: str, events: list[dict]) -> None:
    """Aggregates equal a plain-Python computation; every event is exactly once in the archive."""
    stored = (await stored_aggregates(db, tenant)).normalized()
    expected = aggregate_python(expected_records(tenant, events)).normalized()
    assert stored["learner_days"] == expected["learner_days"]
    assert stored["learner_day_actions"] == expected["learner_day_actions"]
    assert stored["course_days"] == expected["course_days"]
    assert stored["course_hours"] == expected["course_hours"]
    ids = await archived_ids(settings, db, tenant)
    assert set(ids) == {e["id"] for e in events}
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1][:5]


def consumer_pids(ray, shard_ids: list[str]) -> dict[str, int]:
    return {s: ray.get(ray.get_actor(consumer_name(s)).info.remote(), timeout=30)["pid"] for s in shard_ids}


async def open_shards(settings) -> list[dict]:
    from lap.stream.kinesis import list_shards

    async with AsyncExitStack() as stack:
        kinesis = await open_client(stack, settings, "kinesis")
        shards = await list_shards(kinesis, settings)
    return [s for s in shards if "EndingSequenceNumber" not in s["SequenceNumberRange"]]


# --- tests ---------------------------------------------------------------------------


async def refresh_index(settings, tenant: str) -> None:
    """Make what the tenant's index holds searchable now, rather than at its next periodic refresh."""
    search = open_opensearch(settings)
    try:
        await search.indices.refresh(index=index_name(settings, tenant), ignore_unavailable=True)
    finally:
        await search.close()


async def delete_documents(settings, tenant: str, event_ids: list[str]) -> None:
    """Lose these events from the tenant's search index, as an OpenSearch mishap would."""
    search = open_opensearch(settings)
    try:
        for event_id in event_ids:
            await search.delete(index=index_name(settings, tenant), id=event_id)
    finally:
        await search.close()
