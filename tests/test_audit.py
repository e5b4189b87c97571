"""Reconcile and the audit routes on the session's LAP: clean figures, then every loss we cause is found by id."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone

import httpx
import orjson
import pytest

from lap.aws import open_client
from lap.process.aggregate import aggregate_python
from lap.process.batch import write_aggregates
from lap.process.coordinator import COORDINATOR
from lap.samples import envelope
from lap.sinks.index import index_name, open_opensearch
from tests.support.stack import run_lap
from tests.support.sensors import Sensor
from tests.support.api import get, key
from tests.support.traffic import (
    archived_ids, envelopes, expected_records, make_events, new_tenant, receipts_of, send, stored_aggregates,
    wait_for,
)
from tests.support.traffic import delete_documents


def window(started: datetime) -> dict[str, str]:
    return {"start": (started - timedelta(minutes=1)).isoformat(),
            "end": (datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat()}


def wide_window(started: datetime) -> dict[str, str]:
    """A window of whole minutes (all read from the counters) that starts and ends in the middle of hours."""
    first = started.replace(minute=0, second=0, microsecond=0)
    last = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return {"start": (first - timedelta(minutes=30)).isoformat(), "end": (last + timedelta(minutes=30)).isoformat()}


async def reconcile(settings, token, started, wide: bool = False, **params) -> dict:
    span = wide_window(started) if wide else window(started)
    reply = get(settings, token, "/audit/reconcile", **span, **params)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.fixture(scope="module")
async def audited(lap_up, settings):
    """A tenant's traffic: 300 events, one envelope sent twice, a describe, one refused envelope; all drained."""
    from lap.sinks.store import connect

    started = datetime.now(timezone.utc)
    tenant, sensor = new_tenant(lap_up)
    events = make_events(300)
    bodies = envelopes(events)
    describe = {"id": f"https://example.edu/users/d-{tenant}", "type": "Person"}
    send(settings, sensor, bodies + [bodies[0], orjson.dumps(envelope([describe]))])
    refused = httpx.post(f"{settings.api_url}/caliper", content=b'{"sensor": "x"}', timeout=30,
                         headers={"Authorization": f"Bearer {sensor}", "Content-Type": "application/json"})
    assert refused.status_code == 400
    conn = await connect(settings)
    try:
        await wait_for(conn, tenant, {"accepted": 351, "archived": 301, "indexed": 301, "duplicates": 50},
                       timeout=180, settings=settings)
    finally:
        await conn.close()
    return {"tenant": tenant, "events": events, "describe": describe, "started": started,
            "reader": key(lap_up, tenant, "reader"), "admin": key(lap_up, tenant, "admin")}


async def test_a_clean_window_is_complete(settings, audited):
    report = {}
    for _ in range(20):  # the refused envelope's quarantine row is written in the background
        report = await reconcile(settings, audited["reader"], audited["started"])
        if report["quarantined"] == 1:
            break
    assert report["accepted"] == 351 and report["duplicates"] == 50 and report["describes"] == 1
    assert report["quarantined"] == 1
    assert report["archived"] == report["aggregated"] == report["indexed"] == 301
    assert report["missing"] == {"archive": 0, "aggregate": 0, "index": 0}
    assert report["complete"] is True and report["retention_lost"] == 0
    wide = await reconcile(settings, audited["reader"], audited["started"], wide=True)  # from the minute counters
    assert {k: wide[k] for k in report if k not in ("start", "end")} == \
        {k: report[k] for k in report if k not in ("start", "end")}
    shards = get(settings, audited["reader"], "/audit/shards").json()
    assert sum(s["counts"].get("archived", 0) for s in shards) == 301
    quarantine = get(settings, audited["reader"], "/audit/quarantine", **window(audited["started"])).json()
    assert [e["status"] for e in quarantine["entries"]] == [400]
    assert quarantine["entries"][0]["problems"]


async def test_events_on_their_way_are_not_complete_yet(lap_up, settings, db, ray_driver):
    """With the index writer frozen, archived events wait for the index: nothing is missing, but the window is not
    complete, in the API and the command line (exit 3), until they are indexed; `--wait` waits for that."""
    import signal

    from lap.process.index_writer import INDEX_WRITER

    started = datetime.now(timezone.utc)
    tenant, sensor = new_tenant(lap_up)
    reader = key(lap_up, tenant, "reader")
    writer = ray_driver.get(ray_driver.get_actor(INDEX_WRITER).pid.remote(), timeout=30)
    os.kill(writer, signal.SIGSTOP)
    try:
        send(settings, sensor, envelopes(make_events(200)))
        await wait_for(db, tenant, {"accepted": 200, "archived": 200, "aggregated": 200})
        report = await reconcile(settings, reader, started)
        assert (report["index_pending"], report["indexed"], report["missing"]["index"]) == (200, 0, 0), report
        assert report["nothing_missing"] is True and report["complete"] is False
        span = ["--start", window(started)["start"], "--end", window(started)["end"]]
        waiting = run_lap("reconcile", "--tenant", tenant, *span, config=lap_up.config, check=False)
        assert waiting.returncode == 3 and "nothing missing so far" in waiting.stdout, waiting.stdout
    finally:
        os.kill(writer, signal.SIGCONT)
    settled = run_lap("reconcile", "--tenant", tenant, *span, "--wait", "120", "--json", config=lap_up.config,
                      timeout=200)
    assert json.loads(settled.stdout)["complete"] is True


async def test_reconcile_finds_each_loss_by_id(settings, audited, db, ray_driver):
    tenant, reader = audited["tenant"], audited["reader"]
    ids = sorted(e["id"] for e in audited["events"])

    # 1. documents deleted from the index
    gone_from_index = ids[:3]
    await delete_documents(settings, tenant, gone_from_index)

    # 2. a committed batch lost: no manifest row, no archive objects named, its counters and aggregates undone
    batch_id, undone = await undo_batch(settings, db, tenant, audited["events"], ids[-1])

    # 3. an archive object of another batch vanishes from S3
    key = await db.fetchval(
        """SELECT o.key FROM archive_objects o WHERE o.tenant = $1 AND o.batch_id <> $2 ORDER BY o.key LIMIT 1""",
        tenant, batch_id)
    async with AsyncExitStack() as stack:
        s3 = await open_client(stack, settings, "s3")
        reply = await s3.get_object(Bucket=settings.archive.bucket, Key=key)
        async with reply["Body"] as body:
            lines = gzip.decompress(await body.read()).splitlines()
        vanished = sorted(orjson.loads(line)["meta"]["event_id"] for line in lines)
        await s3.delete_object(Bucket=settings.archive.bucket, Key=key)

    report = await reconcile(settings, reader, audited["started"], detail="ids")
    assert report["complete"] is False
    assert report["missing_ids"]["index"] == gone_from_index
    assert report["missing_ids"]["aggregate"] == undone
    assert report["missing_ids"]["archive"] == sorted(set(undone) | set(vanished))
    assert report["missing"] == {"archive": len(set(undone) | set(vanished)), "aggregate": len(undone),
                                 "index": len(gone_from_index)}
    assert report["retention_lost"] == 0  # the stream still has every record: replay from it is possible
    # the counts alone say the same, once the coordinator's periodic check has seen the lost object (run
    # here rather than waited for): over whole hours (the lost object's hour inside the window), and over
    # minutes with partial minutes at the edges (the window cuts the lost object's hour)
    ray_driver.get(ray_driver.get_actor(COORDINATOR).sweep.remote(), timeout=120)
    figures = ("accepted", "duplicates", "archived", "aggregated", "indexed", "missing")
    for wide in (True, False):
        counts = await reconcile(settings, reader, audited["started"], wide=wide)
        assert counts["archive_checked_at"] is not None
        assert {k: counts[k] for k in figures} == {k: report[k] for k in figures}, wide
        assert counts["complete"] is False

    # paging the ids, a few at a time: the same lists
    seen: dict[str, list[str]] = {"archive": [], "aggregate": [], "index": []}
    cursor = None
    for _ in range(500):
        page = await reconcile(settings, reader, audited["started"], detail="ids", limit=7,
                               **({"cursor": cursor} if cursor else {}))
        for stage, stage_ids in page["missing_ids"].items():
            seen[stage] += stage_ids
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == report["missing_ids"]

    # one replay (from the stream: the vanished object is in no archive) makes the window complete ...
    first = await replay(settings, audited["admin"], audited["started"], ["archive", "aggregate", "index"], "stream")
    assert first["status"] == "done", first
    report = await reconcile(settings, reader, audited["started"])
    assert report["complete"] is True, report
    assert (await reconcile(settings, reader, audited["started"], wide=True))["complete"] is True
    assert report["archived"] == report["aggregated"] == report["indexed"] == 301
    await assert_aggregates(db, tenant, audited["events"])
    # ... and a second one changes nothing
    second = await replay(settings, audited["admin"], audited["started"], ["archive", "aggregate", "index"], "archive")
    assert second["status"] == "done", second
    assert second["result"]["replayed"] == {"restored": 0, "objects_rewritten": 0, "indexed": 0}
    assert (await reconcile(settings, reader, audited["started"]))["complete"] is True
    await assert_aggregates(db, tenant, audited["events"])
    ids = await archived_ids(settings, db, tenant)
    assert max(ids.values()) == 1 and len(ids) == 301


async def test_a_document_counts_for_the_batch_that_made_it_and_no_other(settings):
    """A writer that died between its bulk and its commit left documents: the next try of that batch counts them,
    any other batch that meets them does not, and an existing document is never overwritten."""
    from lap.process.index_writer import bulk_index

    tenant = f"bulk{datetime.now(timezone.utc):%H%M%S%f}"
    received = datetime.now(timezone.utc).isoformat()
    lines = [{"meta": {"event_id": f"urn:uuid:{tenant}-{n}", "tenant": tenant, "sensor": "s", "type": "Event",
                       "action": "Viewed", "learner": "https://example.edu/u/1", "course": None,
                       "event_time": received, "received_at": received},
              "item": {"actor": "https://example.edu/u/1", "object": "https://example.edu/page"}} for n in range(6)]
    search = open_opensearch(settings)
    try:
        ok, counted, refused = await bulk_index(search, settings, lines[:4], 7)  # a try that never committed
        assert (len(ok), len(counted), refused) == (4, 4, [])
        ok, counted, refused = await bulk_index(search, settings, lines, 7)  # the same batch, tried again
        assert (len(ok), [line["meta"]["event_id"] for line in counted], refused) == (
            6, [line["meta"]["event_id"] for line in lines[4:] + lines[:4]], [])
        ok, counted, refused = await bulk_index(search, settings, lines[:2], 8)  # another batch meets them
        assert (len(ok), counted, refused) == (2, [], [])
        doc = await search.get(index=index_name(settings, tenant), id=lines[0]["meta"]["event_id"])
        assert doc["_source"]["batch"] == 7
    finally:
        await search.close()


async def undo_batch(settings, db, tenant: str, events: list[dict], event_id: str) -> tuple[int, list[str]]:
    """Lose the committed batch that stored `event_id`, as if its commit had never happened; its id and event ids.

    Its manifest row and archive objects' rows go, its audit counters and the
    tenant's aggregates drop by what it held (the aggregates become those of
    `events` minus the batch's); its archive objects stay in S3 as orphans and
    its receipt objects stay. Nothing else may write the tenant's aggregates
    meanwhile, and the batch must hold no other tenant's events.
    """
    objects = await db.fetch("SELECT key, batch_id FROM archive_objects WHERE tenant = $1", tenant)
    lines_of: dict[str, list[dict]] = {}
    async with AsyncExitStack() as stack:
        s3 = await open_client(stack, settings, "s3")
        for obj in objects:
            reply = await s3.get_object(Bucket=settings.archive.bucket, Key=obj["key"])
            async with reply["Body"] as body:
                lines_of[obj["key"]] = [orjson.loads(x) for x in gzip.decompress(await body.read()).splitlines()]
    batch_id = next(o["batch_id"] for o in objects if any(x["meta"]["event_id"] == event_id for x in lines_of[o["key"]]))
    assert {r["tenant"] for r in await db.fetch("SELECT tenant FROM archive_objects WHERE batch_id = $1", batch_id)} \
        == {tenant}, "the batch holds another tenant's events too"
    lines = [x for o in objects if o["batch_id"] == batch_id for x in lines_of[o["key"]]]
    groups: dict[tuple, list[dict]] = {}
    for line in lines:
        meta = line["meta"]
        received = datetime.fromisoformat(meta["received_at"].replace("Z", "+00:00"))
        groups.setdefault((meta["sensor"], meta["shard_id"], received.replace(second=0, microsecond=0)), []).append(meta)
    for (sensor, shard, minute), metas in groups.items():
        describes = sum(1 for m in metas if m["kind"] == "entity")
        for stage, n in (("archived", len(metas)), ("aggregated", len(metas)), ("describes", describes)):
            await db.execute(
                """UPDATE stage_counts SET events = events - $6 WHERE tenant = $1 AND sensor = $2 AND shard_id = $3
                      AND received_minute = $4 AND stage = $5""", tenant, sensor, shard, minute, stage, n)
    await db.execute("DELETE FROM batches WHERE id = $1", batch_id)  # and its archive_objects rows with it
    undone = sorted(line["meta"]["event_id"] for line in lines)
    kept_events = [e for e in events if e["id"] not in set(undone)]
    async with db.transaction():
        for table in ("learner_days", "learner_day_actions", "course_days", "course_hours"):
            await db.execute(f"DELETE FROM {table} WHERE tenant = $1", tenant)
        await write_aggregates(db, aggregate_python(expected_records(tenant, kept_events)))
    return batch_id, undone


async def assert_aggregates(db, tenant: str, events: list[dict]) -> None:
    stored = (await stored_aggregates(db, tenant)).normalized()
    assert stored == aggregate_python(expected_records(tenant, events)).normalized()


async def replay(settings, admin: str, started: datetime, stages: list[str], source: str) -> dict:
    span = window(started)
    reply = httpx.post(f"{settings.api_url}/v1/audit/replay", timeout=30, headers={"Authorization": f"Bearer {admin}"},
                       json={"start": span["start"], "end": span["end"], "stages": stages, "source": source})
    assert reply.status_code == 202, reply.text
    replay_id = reply.json()["id"]
    for _ in range(240):
        status = get(settings, admin, f"/audit/replay/{replay_id}").json()
        if status["status"] != "running":
            return status
        await asyncio.sleep(0.5)
    raise AssertionError(f"replay {replay_id} still running: {status}")


async def test_a_replay_whose_replica_died_is_resumed_or_failed_in_bounded_time(settings, audited, db):
    """What a replica that died mid-replay leaves behind: a `running` row whose heartbeat stopped. Another replica
    resumes it (or, after REPLAY_MAX_RUNS runs, marks it failed) within REPLAY_STALE_S + REPLAY_WATCH_S."""
    from lap.audit.replay import new_replay_id
    from lap.audit.jobs import REPLAY_MAX_RUNS, REPLAY_STALE_S, REPLAY_WATCH_S

    span = window(audited["started"])
    start, end = (datetime.fromisoformat(span[k]) for k in ("start", "end"))
    orphan, worn_out = new_replay_id(), new_replay_id()
    for replay_id, runs in ((orphan, 1), (worn_out, REPLAY_MAX_RUNS)):
        await db.execute(
            """INSERT INTO replays (id, tenant, window_start, window_end, stages, source, status, heartbeat_at, attempts,
                                    requested_at)
               VALUES ($1, $2, $3, $4, ARRAY['index'], 'archive', 'running', now() - interval '5 minutes', $5,
                       now() - interval '5 minutes')""", replay_id, audited["tenant"], start, end, runs)
    deadline = asyncio.get_running_loop().time() + REPLAY_STALE_S + 3 * REPLAY_WATCH_S + 30
    states: dict[str, dict] = {}
    while asyncio.get_running_loop().time() < deadline:
        states = {i: get(settings, audited["admin"], f"/audit/replay/{i}").json() for i in (orphan, worn_out)}
        if all(state["status"] != "running" for state in states.values()):
            break
        await asyncio.sleep(1)
    assert states[orphan]["status"] == "done", states[orphan]
    assert states[orphan]["result"]["replayed"] is not None
    assert states[worn_out]["status"] == "failed" and "ask for the replay again" in states[worn_out]["error"]
    assert await db.fetchval("SELECT attempts FROM replays WHERE id = $1", orphan) == 2


def test_replay_needs_an_admin_key(settings, audited):
    span = window(audited["started"])
    body = {"start": span["start"], "end": span["end"], "stages": ["index"]}
    reply = httpx.post(f"{settings.api_url}/v1/audit/replay", json=body, timeout=30,
                       headers={"Authorization": f"Bearer {audited['reader']}"})
    assert reply.status_code == 403
    bad = httpx.post(f"{settings.api_url}/v1/audit/replay", json=body | {"stages": ["everything"]}, timeout=30,
                     headers={"Authorization": f"Bearer {audited['admin']}"})
    assert bad.status_code == 400 and bad.json()["detail"]
    assert get(settings, audited["reader"], "/audit/replay/nope").status_code == 404


@pytest.mark.parametrize("start,words", [
    ("0001-01-01T00:00:00+14:00", "out of the range"),
    ((datetime.now(timezone.utc) - timedelta(days=3)).isoformat(), "past the dedup window"),
])
def test_a_replay_that_cannot_be_done_is_refused_up_front(settings, audited, start, words):
    """Refused with 400 when asked, not accepted with 202 and failed later; and no internals in the text."""
    body = {"start": start, "end": (datetime.now(timezone.utc) - timedelta(days=2)).isoformat(), "stages": ["index"]}
    reply = httpx.post(f"{settings.api_url}/v1/audit/replay", json=body, timeout=30,
                       headers={"Authorization": f"Bearer {audited['admin']}"})
    assert reply.status_code == 400, reply.text
    detail = reply.json()["detail"]
    assert words in detail and "$" not in detail and "datetime." not in detail


@pytest.mark.parametrize("params", [
    {"start": "2026-11-02T00:00:00Z", "end": "2026-11-01T00:00:00Z"},
    {"start": "2026-11-01T00:00:00", "end": "2026-11-02T00:00:00"},
    {"start": "2026-01-01T00:00:00Z", "end": "2026-03-01T00:00:00Z"},
    {"start": "2026-11-01T00:00:00Z"},
    {"start": "2026-11-01T00:00:00Z", "end": "2026-11-02T00:00:00Z", "detail": "everything"},
    {"start": "2026-11-01T00:00:00Z", "end": "2026-11-02T00:00:00Z", "cursor": "bad"},
    {"start": "2026-11-01T00:00:00Z", "end": "2026-11-02T00:00:00Z", "sensor": "\x00"},
    {"start": "0001-01-01T00:00:00+14:00", "end": "2026-11-02T00:00:00Z"},
])
def test_bad_reconcile_parameters_get_400(settings, audited, params):
    reply = get(settings, audited["reader"], "/audit/reconcile", **params)
    assert reply.status_code == 400, reply.text
    assert reply.json()["detail"]


def test_windows_past_the_dedup_window_are_counted_on_whole_hours_only(settings, audited):
    """Receipts and dedup rows older than the dedup window are deleted: only the hourly counters can answer."""
    old = (datetime.now(timezone.utc) - timedelta(days=9)).replace(minute=0, second=0, microsecond=0)
    whole = {"start": old.isoformat(), "end": (old + timedelta(hours=2)).isoformat()}
    counted = get(settings, audited["reader"], "/audit/reconcile", **whole)
    assert counted.status_code == 200, counted.text
    assert counted.json()["accepted"] == 0 and counted.json()["complete"] is True
    for params, words in (({"start": (old + timedelta(minutes=30)).isoformat()}, "whole hours"),
                          ({"detail": "ids"}, "single events"), ({"sensor": "https://x.example/s"}, "single events")):
        refused = get(settings, audited["reader"], "/audit/reconcile", **(whole | params))
        assert refused.status_code == 400, refused.text
        assert words in refused.json()["detail"]


async def test_another_tenant_sees_none_of_these_figures(lap_up, settings, audited):
    other, _ = new_tenant(lap_up)
    report = await reconcile(settings, key(lap_up, other, "reader"), audited["started"], detail="ids")
    assert report["accepted"] == report["archived"] == report["quarantined"] == 0
    assert report["missing_ids"] == {"archive": [], "aggregate": [], "index": []}
    shards = get(settings, key(lap_up, other, "reader"), "/audit/shards").json()
    assert all(s["counts"] == {} for s in shards)


def on_a_terminal(*args: str, config) -> tuple[int, str]:
    """Runs `lap` with its stderr on a pseudo-terminal; returns the exit code and what it drew there."""
    import subprocess
    import threading

    from tests.support.stack import LAP

    master, slave = os.openpty()
    drawn: list[bytes] = []

    def drain():
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the other end closed
                return
            if not chunk:
                return
            drawn.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAP_")}
    try:
        result = subprocess.run([*LAP, *args, "--config", str(config)], stdout=subprocess.PIPE, stderr=slave,
                                env=env, timeout=180)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    return result.returncode, b"".join(drawn).decode(errors="replace")


async def test_reconcile_and_replay_from_the_command_line(lap_up, settings, db):
    started = datetime.now(timezone.utc)
    tenant, sensor = new_tenant(lap_up)
    events = make_events(100)
    send(settings, sensor, envelopes(events))
    await wait_for(db, tenant, {"accepted": 100, "archived": 100, "indexed": 100}, timeout=180, settings=settings)
    span = window(started)
    args = ["--tenant", tenant, "--start", span["start"], "--end", span["end"]]
    clean = run_lap("reconcile", *args, "--json", config=lap_up.config)
    assert json.loads(clean.stdout)["complete"] is True

    lost = sorted(e["id"] for e in events)[:2]
    await delete_documents(settings, tenant, lost)
    found = run_lap("reconcile", *args, "--ids", config=lap_up.config, check=False)
    assert found.returncode == 1 and "NOT complete" in found.stdout
    assert [line.split(": ")[1] for line in found.stdout.splitlines() if line.startswith("missing from index")] == lost

    repaired = run_lap("replay", *args, "--stages", "index", config=lap_up.config)
    assert "replayed: indexed 2" in repaired.stdout and "complete" in repaired.stdout
    assert repaired.stderr.strip() == "", repaired.stderr  # no terminal: no progress bar, no stray line
    # the command line's replay is a job like the API's: its row says how it went, for the tenant's readers
    replay_id = repaired.stdout.split()[1]
    job = get(settings, key(lap_up, tenant, "reader"), f"/audit/replay/{replay_id}").json()
    assert job["status"] == "done" and job["result"]["replayed"]["indexed"] == 2 and job["stages"] == ["index"], job
    assert run_lap("reconcile", *args, config=lap_up.config).returncode == 0

    # on a terminal, both draw a bar on stderr while they read
    await delete_documents(settings, tenant, lost)
    code, drawn = on_a_terminal("reconcile", *args, "--ids", config=lap_up.config)
    assert code == 1 and "receipts" in drawn and "100%" in drawn, drawn[-500:]
    code, drawn = on_a_terminal("replay", *args, "--stages", "index", config=lap_up.config)
    assert code == 0 and "index" in drawn and "100%" in drawn, drawn[-500:]

    wrong = run_lap("replay", *args, "--stages", "everything", config=lap_up.config, check=False)
    assert wrong.returncode != 0 and "--stages takes" in wrong.stderr and "Traceback" not in wrong.stderr
    backwards = run_lap("reconcile", "--tenant", tenant, "--start", span["end"], "--end", span["start"],
                        config=lap_up.config, check=False)
    assert backwards.returncode != 0 and "--end must be after --start" in backwards.stderr


async def test_a_replay_while_live_traffic_goes_on(lap_up, settings, db):
    """A replay that restores a lost batch runs while the same tenant sends more: both count once."""
    started = datetime.now(timezone.utc)
    tenant, sensor = new_tenant(lap_up)
    admin, reader = key(lap_up, tenant, "admin"), key(lap_up, tenant, "reader")
    first = make_events(200)
    send(settings, sensor, envelopes(first))
    await wait_for(db, tenant, {"accepted": 200, "archived": 200, "indexed": 200}, timeout=180, settings=settings)
    _, undone = await undo_batch(settings, db, tenant, first, min(e["id"] for e in first))

    # the same learners and courses keep sending, envelope after envelope, until the replay is done
    live = Sensor(settings, sensor, make_events(20_000))
    live.start()
    try:
        await asyncio.sleep(1)
        before = len(live.acknowledged)
        done = await replay(settings, admin, started, ["archive", "aggregate", "index"], "stream")
        during = len(live.acknowledged) - before
    finally:
        live.stop.set()
        live.join(120)
    assert done["status"] == "done", done
    assert during > 0, "live traffic must go on while the replay runs"
    assert set(live.statuses) == {200}, live.statuses
    # the lost batch, and perhaps live events still in flight when it looked (the live consumer skips those)
    assert done["result"]["replayed"]["restored"] >= len(undone)

    total = len(first) + len(live.acknowledged)
    await wait_for(db, tenant, {"accepted": total, "archived": total, "aggregated": total, "indexed": total},
                   timeout=180, settings=settings)
    report = await reconcile(settings, reader, started)
    assert report["complete"] is True and report["accepted"] == total and report["duplicates"] == 0, report
    await assert_aggregates(db, tenant, first + live.acknowledged)
    ids = await archived_ids(settings, db, tenant)
    assert len(ids) == total and max(ids.values()) == 1


async def test_window_edges_include_start_and_exclude_end(settings, audited, db):
    """A window from one receipt's time to another's counts the first and not the second."""
    receipts = await receipts_of(settings, audited["tenant"], audited["started"] - timedelta(minutes=1))
    times = sorted(set(receipts.received_us.tolist()))
    assert len(times) >= 3
    start_us, end_us = times[1], times[-1]
    expected = int(((receipts.received_us >= start_us) & (receipts.received_us < end_us)).sum())
    at_start = int((receipts.received_us == start_us).sum())
    assert 0 < at_start < expected
    start, end = (datetime.fromtimestamp(us / 1e6, timezone.utc) for us in (start_us, end_us))
    reply = get(settings, audited["reader"], "/audit/reconcile", start=start.isoformat(), end=end.isoformat())
    assert reply.status_code == 200, reply.text
    assert reply.json()["accepted"] == expected


async def test_counts_take_a_lost_objects_events_inside_a_window_that_cuts_its_hour(settings, db):
    """A lost archive object holds a whole hour; a window of whole minutes that cuts that hour loses only
    the object's events inside the window, counted from its batch's receipt object. Seeded rows and objects,
    so that the events sit on both sides of the edges."""
    from lap.audit.receipts import encode_receipts, receipt_key
    from lap.audit.reconcile import Reconciler, Window
    from lap.process.batch import Decoded
    from lap.sinks.store import create_pool

    tenant = f"cut{datetime.now(timezone.utc):%H%M%S%f}"
    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    minutes = (5, 20, 40, 55)  # the window below is [:10, :50): two inside, two outside
    batch = await db.fetchval("""INSERT INTO batches (stream, shard_id, first_seq, last_seq, records, events, describes,
                                                      duplicates) VALUES ('seeded', $1, 1, 4, 4, 4, 0, 0) RETURNING id""",
                              tenant)
    key = f"archive/v1/tenant={tenant}/seeded.jsonl.gz"
    await db.execute("""INSERT INTO archive_objects (key, batch_id, tenant, received_hour, records, bytes)
                        VALUES ($1, $2, $3, $4, 4, 100)""", key, batch, tenant, hour)
    await db.execute("""INSERT INTO lost_archive_objects (key, tenant, received_hour, records)
                        VALUES ($1, $2, $3, 4)""", key, tenant, hour)
    copies = [Decoded(n + 1, 0, {"event_id": f"urn:uuid:cut-{n}", "tenant": tenant, "sensor": "s", "kind": "event",
                                 "request_id": "r"}, {}, hour + timedelta(minutes=minute))
              for n, minute in enumerate(minutes)]
    receipts = receipt_key(settings.archive.receipts_prefix, tenant, hour, tenant, 1, 4, (5, 55))
    for copy in copies:
        for stage in ("accepted", "archived", "aggregated"):
            await db.execute("""INSERT INTO stage_counts (tenant, sensor, shard_id, received_minute, stage, events)
                                VALUES ($1, 's', $1, $2, $3, 1)""", tenant, copy.received_at, stage)
    pool = await create_pool(settings)
    search = open_opensearch(settings)
    try:
        async with AsyncExitStack() as stack:
            s3 = await open_client(stack, settings, "s3")
            await s3.put_object(Bucket=settings.archive.bucket, Key=receipts,
                                Body=encode_receipts(tenant, tenant, 1, 4, copies, [False] * 4))
            reconciler = Reconciler(settings, pool, s3, search)
            cut = await reconciler.counts(Window(tenant, hour + timedelta(minutes=10), hour + timedelta(minutes=50)))
            whole = await reconciler.counts(Window(tenant, hour, hour + timedelta(hours=1)))
            await s3.delete_object(Bucket=settings.archive.bucket, Key=receipts)
    finally:
        await search.close()
        await pool.close()
        for table in ("lost_archive_objects", "stage_counts", "archive_objects"):
            await db.execute(f"DELETE FROM {table} WHERE tenant = $1", tenant)  # seeded rows name no real object
        await db.execute("DELETE FROM batches WHERE id = $1", batch)
    assert (cut.accepted, cut.aggregated, cut.archived) == (2, 2, 0)
    assert cut.missing["archive"] == 2 and cut.missing["aggregate"] == 0
    assert (whole.accepted, whole.archived, whole.missing["archive"]) == (4, 0, 4)


async def test_format_0_records_and_format_1_records_in_one_stream(lap_up, settings, db):
    """Records of format 0 (one event each, from before this release) and format 1 in one stream: exact
    aggregates, a complete reconcile, and a replay from the stream that reads both."""
    from lap.stream.producer import Producer, Record, partition_key_for
    from lap.stream.records_client import RecordsClient

    started = datetime.now(timezone.utc)
    tenant, sensor = new_tenant(lap_up)
    admin, reader = key(lap_up, tenant, "admin"), key(lap_up, tenant, "reader")
    events = make_events(400)
    old, new = events[:200], events[200:]

    # format 0, written the way the first ingest wrote it: one record per event
    received_at = datetime.now(timezone.utc)
    records = []
    for line in expected_records(tenant, old):
        line["meta"] |= {"sensor": "https://lms.example.edu/sensors/lms", "key_id": "old", "request_id": "old-req",
                         "received_at": received_at.isoformat().replace("+00:00", "Z"),
                         "data_version": "http://purl.imsglobal.org/ctx/caliper/v1p2"}
        records.append(Record(orjson.dumps(line), partition_key_for(line["meta"]["learner"])))
    client = RecordsClient(settings)
    try:
        assert len(await Producer(client, settings.stream.name, 30.0).put(records)) == 200
    finally:
        await client.close()
    send(settings, sensor, envelopes(new))  # format 1
    await wait_for(db, tenant, {"accepted": 400, "archived": 400, "aggregated": 400, "indexed": 400}, timeout=180, settings=settings)
    await assert_aggregates(db, tenant, events)
    ids = await archived_ids(settings, db, tenant)
    assert set(ids) == {e["id"] for e in events} and max(ids.values()) == 1
    report = await reconcile(settings, reader, started)
    assert report["complete"] is True and report["accepted"] == 400 and report["duplicates"] == 0, report

    # lose a batch of each format, then replay them from the stream
    _, undone_old = await undo_batch(settings, db, tenant, events, old[0]["id"])
    remaining = [e for e in events if e["id"] not in set(undone_old)]
    other = next(e["id"] for e in reversed(new) if e["id"] not in set(undone_old))
    _, undone_new = await undo_batch(settings, db, tenant, remaining, other)
    assert set(undone_old) & {e["id"] for e in old} and set(undone_new) & {e["id"] for e in new}
    report = await reconcile(settings, reader, started)
    assert report["missing"]["aggregate"] == len(undone_old) + len(undone_new), report
    done = await replay(settings, admin, started, ["archive", "aggregate", "index"], "stream")
    assert done["status"] == "done", done
    assert done["result"]["replayed"]["restored"] == len(undone_old) + len(undone_new)
    report = await reconcile(settings, reader, started)
    assert report["complete"] is True and report["accepted"] == 400, report
    await assert_aggregates(db, tenant, events)
    ids = await archived_ids(settings, db, tenant)
    assert set(ids) == {e["id"] for e in events} and max(ids.values()) == 1


async def test_sigkill_of_an_ingest_replica_under_load_loses_no_acceptance(lap_up, settings, db):
    """A replica SIGKILLed while a sensor sends: whatever the replica held (its counters, requests in flight),
    accepted minus duplicates equals the events the sensor was told were accepted."""
    import os
    import signal

    import psutil

    started = datetime.now(timezone.utc)
    tenant, token = new_tenant(lap_up)
    sensor = Sensor(settings, token, make_events(3000), per=25, retry_any=True)
    sensor.start()
    try:
        await asyncio.sleep(2)
        replicas = [p for p in psutil.Process(lap_up.pid).children(recursive=True)
                    if "ray::ServeReplica:ingest" in " ".join(p.cmdline())]
        assert replicas
        os.kill(replicas[0].pid, signal.SIGKILL)
        await asyncio.get_running_loop().run_in_executor(None, sensor.join, 300)
    finally:
        sensor.stop.set()
    assert not sensor.is_alive() and len(sensor.acknowledged) == 3000
    await wait_for(db, tenant, {"archived": 3000, "aggregated": 3000, "indexed": 3000}, timeout=180, settings=settings)
    report = await reconcile(settings, key(lap_up, tenant, "reader"), started)
    assert report["accepted"] - report["duplicates"] == 3000, report
    assert report["complete"] is True and report["pending"] == 0, report
    await assert_aggregates(db, tenant, sensor.acknowledged)


async def test_poison_records_are_dead_lettered_and_replayed_once_fixed(lap_up, settings, db):
    """A record whose commit fails every time, and a record that is not LAP's: both kept aside, counted and listed;
    the shard goes on; a replay stores the first once its cause is gone, and the window reconciles complete."""
    started = datetime.now(timezone.utc)
    tenant, sensor = new_tenant(lap_up)
    reader, admin = key(lap_up, tenant, "reader"), key(lap_up, tenant, "admin")
    poison_learner = f"https://example.edu/users/poison-{tenant}"
    # the database refuses this learner's rows: a fault at a real boundary that an operator can remove
    constraint = f"poison_{tenant}"
    await db.execute(f"ALTER TABLE learner_days ADD CONSTRAINT {constraint} CHECK (learner <> '{poison_learner}') "
                     "NOT VALID")
    try:
        before, after = make_events(100), make_events(100)
        poison = [e for e in make_events(60) if e["type"] != "GradeEvent"][:10]
        for event in poison:  # one learner: one partition key, so one stream record
            event["actor"] = {"id": poison_learner, "type": "Person"}
        send(settings, sensor, envelopes(before) + envelopes(poison, per=10))
        async with AsyncExitStack() as stack:  # a record some other producer wrote to LAP's stream
            kinesis = await open_client(stack, settings, "kinesis")
            foreign = await kinesis.put_record(StreamName=settings.stream.name, Data=b"not a LAP record",
                                               PartitionKey=f"foreign-{tenant}")
        send(settings, sensor, envelopes(after))
        await wait_for(db, tenant, {"accepted": 210, "archived": 200, "aggregated": 200})
        letters = await db.fetch("SELECT * FROM dead_letters WHERE tenant = $1", tenant)
        assert [(r["events"], "CheckViolation" in r["reason"]) for r in letters] == [(10, True)], letters
        not_lap = await db.fetchrow("SELECT * FROM dead_letters WHERE shard_id = $1 AND sequence_number = $2",
                                    foreign["ShardId"], int(foreign["SequenceNumber"]))
        assert not_lap is not None and not_lap["tenant"] is None and "not a LAP record" in not_lap["reason"]
        async with AsyncExitStack() as stack:  # each kept as read from the stream
            s3 = await open_client(stack, settings, "s3")
            for row, data in ((not_lap, b"not a LAP record"), (letters[0], None)):
                reply = await s3.get_object(Bucket=settings.archive.bucket, Key=row["key"])
                async with reply["Body"] as body:
                    kept = orjson.loads(await body.read())
                assert kept["sequence_number"] == str(row["sequence_number"]) and kept["reason"] == row["reason"]
                assert data is None or base64.b64decode(kept["data_base64"]) == data

        # reconcile: its own figure, not missing, and the window is not complete; the audit route lists it
        report = await reconcile(settings, reader, started)
        assert (report["accepted"], report["archived"], report["dead_lettered"]) == (210, 200, 10), report
        assert report["missing"] == {"archive": 0, "aggregate": 0, "index": 0} and report["complete"] is False
        report = await reconcile(settings, reader, started, detail="ids")
        assert report["dead_lettered"] == 10 and report["missing_ids"] == {"archive": [], "aggregate": [], "index": []}
        listed = get(settings, reader, "/audit/dead-letters", **window(started)).json()["entries"]
        assert [(e["events"], e["replayed_at"]) for e in listed] == [(10, None)]

        # a replay while the cause is still there: the record stays dead-lettered, nothing else changes
        status = await replay(settings, admin, started, ["aggregate", "archive", "index"], "archive")
        assert status["status"] == "done", status
        assert (await reconcile(settings, reader, started))["dead_lettered"] == 10
    finally:
        await db.execute(f"ALTER TABLE learner_days DROP CONSTRAINT IF EXISTS {constraint}")

    # the cause fixed, a replay stores the events once and closes the dead letter
    status = await replay(settings, admin, started, ["aggregate", "archive", "index"], "archive")
    assert status["status"] == "done", status
    report = await reconcile(settings, reader, started)
    assert (report["dead_lettered"], report["archived"], report["complete"]) == (0, 210, True), report
    listed = get(settings, reader, "/audit/dead-letters", **window(started)).json()["entries"]
    assert [e["replay_id"] for e in listed] == [status["id"]]
    aggregates = (await stored_aggregates(db, tenant)).normalized()
    expected = aggregate_python(expected_records(tenant, before + poison + after)).normalized()
    assert aggregates == expected
    ids = await archived_ids(settings, db, tenant)
    assert set(ids) == {e["id"] for e in before + poison + after} and max(ids.values()) == 1
