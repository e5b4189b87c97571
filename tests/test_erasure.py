"""Erasure of a learner against the real servers: the learner's events leave every store and stay out, every
other learner's figures stay exact, and reconcile is complete with the erased count."""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import subprocess
import uuid
from contextlib import AsyncExitStack
from datetime import datetime, timezone
from urllib.parse import quote

import httpx
import orjson

from lap.audit.tombstones import learner_hash
from lap.aws import open_client
from lap.samples import envelope
from lap.sinks.archive import learner_hash32
from lap.sinks.index import index_name, open_opensearch
from tests.support.api import get, key
from tests.support.sensors import Sensor
from tests.support.stack import LAP, run_lap
from tests.support.traffic import (
    envelopes, expected_records, make_events, new_tenant, receipts_of, send, stage_totals, wait_for,
)
from tests.test_audit import assert_aggregates, reconcile, replay, undo_batch


def learner_of(tenant: str, event: dict) -> str:
    return expected_records(tenant, [event])[0]["meta"]["learner"]


def erase(settings, token: str, learner: str) -> httpx.Response:
    return httpx.delete(f"{settings.api_url}/v1/learners/{quote(learner, safe='')}", timeout=60,
                        headers={"Authorization": f"Bearer {token}"})


async def erased(settings, token: str, job_id: str, timeout: float = 240) -> dict:
    for _ in range(int(timeout * 2)):
        status = get(settings, token, f"/erasures/{job_id}").json()
        if status["status"] != "running":
            return status
        await asyncio.sleep(0.5)
    raise AssertionError(f"erasure {job_id} still running: {status}")


async def assert_gone(settings, db, tenant: str, learner: str, their_ids: set[str], since: datetime) -> None:
    """No store holds the learner's events: not the archive, the receipts, the index or the aggregates."""
    keys = [r["key"] for r in await db.fetch("SELECT key FROM archive_objects WHERE tenant = $1", tenant)]
    async with AsyncExitStack() as stack:
        s3 = await open_client(stack, settings, "s3")
        archive = []
        for obj_key in keys:  # every object the manifest names is whole, and holds none of the learner's lines
            reply = await s3.get_object(Bucket=settings.archive.bucket, Key=obj_key)
            async with reply["Body"] as body:
                archive += [orjson.loads(x) for x in gzip.decompress(await body.read()).splitlines()]
        listed = []
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=settings.archive.bucket,
                                             Prefix=f"{settings.archive.prefix}/tenant={quote(tenant, safe='')}/"):
            listed += [o["Key"] for o in page.get("Contents", [])]
    assert not [x for x in archive if x["meta"].get("learner") == learner]
    assert not their_ids & {x["meta"]["event_id"] for x in archive}
    rewritten = {r["old_key"] for r in await db.fetch(
        """SELECT old_key FROM erasure_objects o JOIN erasures e ON e.id = o.erasure_id WHERE e.tenant = $1""",
        tenant)}
    assert rewritten and not rewritten & set(listed), "an object the erasure rewrote is still in S3"
    for orphan in set(listed) - set(keys):  # objects of batches that never committed hold none of it either
        async with AsyncExitStack() as stack:
            s3 = await open_client(stack, settings, "s3")
            reply = await s3.get_object(Bucket=settings.archive.bucket, Key=orphan)
            async with reply["Body"] as body:
                lines = [orjson.loads(x) for x in gzip.decompress(await body.read()).splitlines()]
        assert not their_ids & {x["meta"]["event_id"] for x in lines}, orphan
    receipts = await receipts_of(settings, tenant, since)
    assert not their_ids & set(receipts.event_id)
    search = open_opensearch(settings)
    try:
        await search.indices.refresh(index=index_name(settings, tenant))
        hits = await search.count(index=index_name(settings, tenant), body={"query": {"term": {"learner": learner}}})
        assert hits["count"] == 0, hits
        found = await search.mget(index=index_name(settings, tenant), body={"ids": sorted(their_ids)},
                                  params={"_source": "false"})
        assert not [d["_id"] for d in found["docs"] if d.get("found")]
    finally:
        await search.close()
    assert await db.fetchval("SELECT count(*) FROM learner_days WHERE tenant = $1 AND learner = $2", tenant,
                             learner) == 0
    assert await db.fetchval("SELECT count(*) FROM learner_day_actions WHERE tenant = $1 AND learner = $2", tenant,
                             learner) == 0


async def test_a_learner_erased_during_a_live_send_is_in_no_store_and_stays_out(lap_up, settings, db):
    """Events of the learner before, during and after the erasure, and some lost before it (a batch undone):
    after the erasure, a replay from the stream and an index rebuild, the learner is nowhere, every other
    learner's figures are exact, and reconcile is complete with the erased events counted as such."""
    started = datetime.now(timezone.utc)
    tenant, sensor = new_tenant(lap_up)
    admin, reader = key(lap_up, tenant, "admin"), key(lap_up, tenant, "reader")
    before = make_events(400, learners=20)
    learner = learner_of(tenant, before[0])
    send(settings, sensor, envelopes(before))
    await wait_for(db, tenant, {"archived": 400, "aggregated": 400, "indexed": 400}, timeout=180, settings=settings)
    # a batch lost before the erasure: its events (some of the learner's too) are in no store, only the stream
    _, undone = await undo_batch(settings, db, tenant, before, before[0]["id"])
    stored_before = [e for e in before if e["id"] not in set(undone)]

    during = make_events(3000, learners=20)
    for event in during[::5]:  # the learner keeps sending while being erased
        event["actor"] = before[0]["actor"]
    live = Sensor(settings, sensor, during, per=20, pause=0.1)  # 150 requests: at least 15 s of sending
    live.start()
    try:
        # the lost batch may have held all of the learner's earlier events: it is known again once a live one is
        # aggregated, and the erasure is asked for while the sender goes on
        for _ in range(240):
            if await db.fetchval("SELECT count(*) FROM learner_days WHERE tenant = $1 AND learner = $2", tenant,
                                 learner):
                break
            await asyncio.sleep(0.25)
        assert live.is_alive(), "the live send ended before the learner's first live event was aggregated"
        reply = erase(settings, admin, learner)
        assert reply.status_code == 202, reply.text
        job = reply.json()
        assert job["status"] == "running" and job["learner_hash"] == learner_hash(tenant, learner)
        assert job["learner_hash"] != learner and learner not in reply.text
        status = await erased(settings, admin, job["id"])
    finally:
        live.join(300)
    assert status["status"] == "done", status
    assert live.statuses.keys() == {200} and len(live.acknowledged) == len(during)
    after = make_events(200, learners=20)
    for event in after[::4]:
        event["actor"] = before[0]["actor"]
    send(settings, sensor, envelopes(after))

    everything = before + during + after
    theirs = {e["id"] for e in everything if learner_of(tenant, e) == learner}
    others = [e for e in everything if e["id"] not in theirs]
    assert len(theirs) > 100 and set(undone) & theirs, "the test needs the learner in the lost batch"
    # the lost batch comes back from the stream, but for the learner's events: those are counted erased
    await wait_for(db, tenant, {"accepted": len(everything)}, timeout=180)
    done = await replay(settings, admin, started, ["archive", "aggregate", "index"], "stream")
    assert done["status"] == "done", done
    assert done["result"]["replayed"]["restored"] == len(set(undone) - theirs)
    await wait_for(db, tenant, {"archived": len(others), "aggregated": len(others), "indexed": len(others),
                                "erased": len(theirs)}, timeout=240, settings=settings)

    # the index rebuilt from the archive, as after a lost domain: nothing of the learner comes back
    search = open_opensearch(settings)
    try:
        await search.indices.delete(index=index_name(settings, tenant))
    finally:
        await search.close()
    # what lap.sinks.index.reset_index_progress does for an empty domain, for this test's batches alone
    async with db.transaction():
        await db.execute("DELETE FROM stage_counts WHERE tenant = $1 AND stage = 'indexed'", tenant)
        await db.execute(
            """INSERT INTO index_backfill (stream, shard_id, until_seq, since, batches_total)
               SELECT stream, shard_id, max(last_seq), $2, count(*) FROM batches
                WHERE (stream = $1 OR stream LIKE 'replay:%') AND max_received_at >= $2 GROUP BY stream, shard_id
               ON CONFLICT DO NOTHING""", settings.stream.name, started)
    for _ in range(240):
        if not await db.fetchval("SELECT count(*) FROM index_backfill"):
            break
        await asyncio.sleep(0.5)
    search = open_opensearch(settings)
    try:
        await search.indices.refresh(index=index_name(settings, tenant))
        assert (await search.count(index=index_name(settings, tenant)))["count"] == len(others)
    finally:
        await search.close()

    await assert_gone(settings, db, tenant, learner, theirs, started)
    await assert_aggregates(db, tenant, others)
    report = await reconcile(settings, reader, started)
    assert report["complete"] is True, report
    assert (report["erased"], report["archived"], report["indexed"]) == (len(theirs), len(others), len(others))
    ids = await reconcile(settings, reader, started, detail="ids")
    assert ids["erased"] == len(theirs) and not any(ids["missing_ids"].values()), ids

    # the tombstone: counted, by which key, no IRI; asking again is a no-op that says so
    tomb = get(settings, reader, "/erasures").json()["erasures"]
    assert [t["id"] for t in tomb] == [job["id"]] and tomb[0]["status"] == "done"
    assert tomb[0]["counts"]["archived"] >= 1 and tomb[0]["counts"]["indexed"] >= 1
    assert learner not in str(await db.fetchrow("SELECT * FROM erasures WHERE job_id = $1", job["id"]))
    again = erase(settings, admin, learner)
    assert again.status_code == 202 and again.json()["already"] is True and again.json()["id"] == job["id"]
    cli = run_lap("erase", "--tenant", tenant, "--learner", learner, "--yes", config=lap_up.config)
    assert "already erased" in cli.stdout


async def test_erasure_refuses_what_it_should(lap_up, settings, db):
    """Unknown learners are a 404, readers and sensors get a 403, another tenant's learner is out of reach."""
    tenant, sensor = new_tenant(lap_up)
    other, other_sensor = new_tenant(lap_up)
    events = make_events(50, learners=5)
    send(settings, sensor, envelopes(events))
    await wait_for(db, tenant, {"aggregated": 50})
    learner = learner_of(tenant, events[0])

    unknown = erase(settings, key(lap_up, tenant, "admin"), "https://example.edu/users/nobody")
    assert unknown.status_code == 404 and "no processed events of this learner" in unknown.json()["detail"]
    assert erase(settings, key(lap_up, tenant, "reader"), learner).status_code == 403
    assert erase(settings, sensor, learner).status_code == 403
    assert erase(settings, None, learner).status_code == 401
    assert erase(settings, key(lap_up, other, "admin"), learner).status_code == 404  # not in that tenant
    assert await db.fetchval("SELECT count(*) FROM erasures WHERE tenant = ANY($1)", [tenant, other]) == 0
    refused = run_lap("erase", "--tenant", tenant, "--learner", "https://example.edu/users/nobody", "--yes",
                      config=lap_up.config, check=False)
    assert refused.returncode == 1 and "no processed events of this learner" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (await stage_totals(db, tenant))["aggregated"] == 50


async def test_export_writes_a_learners_events_and_figures(lap_up, settings, db, tmp_path):
    """`lap export`: the learner's events as sent, in received order, their aggregate rows, and a summary."""
    tenant, sensor = new_tenant(lap_up)
    events = make_events(300, learners=6)
    send(settings, sensor, envelopes(events))
    await wait_for(db, tenant, {"archived": 300, "aggregated": 300})
    learner = learner_of(tenant, events[0])
    theirs = [e for e in events if learner_of(tenant, e) == learner]
    out = tmp_path / "learner.jsonl"
    run_lap("export", "--tenant", tenant, "--learner", learner, "--out", str(out), config=lap_up.config)
    lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    exported = [x["event"] for x in lines if x["kind"] == "event"]
    assert sorted(e["id"] for e in exported) == sorted(e["id"] for e in theirs)
    assert {e["id"]: e for e in exported} == {e["id"]: orjson.loads(orjson.dumps(e)) for e in theirs}
    days = [x for x in lines if x["kind"] == "learner_day"]
    assert sum(d["events"] for d in days) == len(theirs)
    assert days and len(days) == await db.fetchval(
        "SELECT count(*) FROM learner_days WHERE tenant = $1 AND learner = $2", tenant, learner)
    assert lines[-1]["kind"] == "summary" and lines[-1]["events"] == len(theirs)
    nobody = run_lap("export", "--tenant", tenant, "--learner", "https://example.edu/users/nobody", "--out",
                     str(tmp_path / "nobody.jsonl"), config=lap_up.config, check=False)
    assert nobody.returncode == 1 and "holds no data" in nobody.stderr and "Traceback" not in nobody.stderr
    assert not (tmp_path / "nobody.jsonl").exists()


async def test_an_erasure_killed_midway_is_resumed_and_a_replay_cannot_bring_events_back(lap_up, settings, db):
    """`lap erase` SIGKILLed while it rewrites the archive: the API's watcher resumes the job, which finishes;
    no object is left half-written, and a replay asked for meanwhile restores nothing of the learner."""
    started = datetime.now(timezone.utc)
    tenant, sensor = new_tenant(lap_up)
    admin, reader = key(lap_up, tenant, "admin"), key(lap_up, tenant, "reader")
    events = make_events(2000, learners=10)
    learner = learner_of(tenant, events[0])
    # many small sends: the learner's events spread over many batches, so the erasure has many objects to do
    send(settings, sensor, envelopes(events, per=25), pause_s=0.05)
    await wait_for(db, tenant, {"archived": 2000, "aggregated": 2000, "indexed": 2000}, timeout=180,
                   settings=settings)
    theirs = {e["id"] for e in events if learner_of(tenant, e) == learner}

    env = {k: v for k, v in os.environ.items() if not k.startswith("LAP_")}
    process = subprocess.Popen([*LAP, "erase", "--tenant", tenant, "--learner", learner, "--yes", "--config",
                                str(lap_up.config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(600):  # killed once it has rewritten some objects
            if await db.fetchval("""SELECT count(*) FROM erasure_objects o JOIN erasures e ON e.id = o.erasure_id
                                     WHERE e.tenant = $1""", tenant):
                break
            await asyncio.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)
    row = await db.fetchrow("SELECT * FROM erasures WHERE tenant = $1", tenant)
    assert row is not None and row["status"] == "running", "the erasure ended before it could be killed"
    racing = await replay(settings, admin, started, ["archive", "aggregate", "index"], "archive")
    assert racing["status"] in ("done", "failed"), racing
    if racing["status"] == "failed":
        assert "erasure" in racing["error"], racing
    status = await erased(settings, admin, row["job_id"], timeout=180)  # resumed by the API's watcher
    assert status["status"] == "done", status
    # each event's one receipt renamed, counted once whichever run renamed it
    assert status["counts"]["receipts"] == status["counts"]["archived"] == len(theirs), status

    others = [e for e in events if e["id"] not in theirs]
    await assert_gone(settings, db, tenant, learner, theirs, started)
    await assert_aggregates(db, tenant, others)
    totals = await stage_totals(db, tenant)
    assert (totals["archived"], totals["indexed"], totals["erased"]) == (len(others), len(others), len(theirs))
    report = await reconcile(settings, reader, started)
    assert report["complete"] is True and report["erased"] == len(theirs), report


async def test_a_deleted_tenant_leaves_nothing_but_its_tombstone(lap_up, settings, db):
    """`lap tenant delete`: keys revoked at once, every object, document and row of the tenant gone (events still
    in flight too), a tombstone of its counts kept, the name retired; another tenant's figures stay exact."""
    started = datetime.now(timezone.utc)
    leaving, leaving_sensor = new_tenant(lap_up)
    staying, staying_sensor = new_tenant(lap_up)
    leaving_reader = key(lap_up, leaving, "reader")
    events, kept = make_events(600), make_events(300)
    send(settings, leaving_sensor, envelopes(events))
    send(settings, staying_sensor, envelopes(kept))
    await wait_for(db, leaving, {"archived": 600, "indexed": 600}, timeout=180, settings=settings)
    bad = httpx.post(f"{settings.api_url}/caliper", content=b'{"sensor": 1}', timeout=30,  # quarantined
                     headers={"Authorization": f"Bearer {leaving_sensor}", "Content-Type": "application/json"})
    assert bad.status_code in (400, 422)
    for _ in range(60):  # the quarantine's row is written a moment after the reply
        if await db.fetchval("SELECT count(*) FROM quarantined WHERE tenant = $1", leaving):
            break
        await asyncio.sleep(0.5)
    assert await db.fetchval("SELECT count(*) FROM quarantined WHERE tenant = $1", leaving) == 1

    send(settings, leaving_sensor, envelopes(make_events(300)))  # acknowledged, and on their way while it goes
    deleted = run_lap("tenant", "delete", leaving, "--yes", config=lap_up.config, timeout=300)
    assert f"deleted tenant {leaving}" in deleted.stdout, deleted.stdout
    later = make_events(200, learners=200)  # once the consumers have stored these, they are past the rest
    send(settings, staying_sensor, envelopes(later))
    await wait_for(db, staying, {"archived": 500, "aggregated": 500}, timeout=180)
    kept += later
    tomb = await db.fetchrow("SELECT * FROM erasures WHERE tenant = $1", leaving)
    counts = orjson.loads(tomb["counts"])
    assert tomb["status"] == "done" and tomb["learner_hash"] is None
    assert counts["acknowledged"] == 900 and 600 <= counts["archived"] <= 900, counts
    assert counts["archive_objects"] >= 1 and counts["receipt_objects"] >= 1, counts

    # its keys no longer work, and its name is not given out again
    assert get(settings, leaving_reader, "/learners").status_code == 401
    again = run_lap("keys", "create", "--tenant", leaving, "--role", "reader", config=lap_up.config, check=False)
    assert again.returncode == 1 and "was deleted" in again.stderr
    # nothing of it in S3, OpenSearch or Postgres
    async with AsyncExitStack() as stack:
        s3 = await open_client(stack, settings, "s3")
        a = settings.archive
        for prefix in (a.prefix, a.receipts_prefix, a.dead_letter_prefix, a.quarantine_prefix):
            listed = await s3.list_objects_v2(Bucket=a.bucket, Prefix=f"{prefix}/tenant={leaving}/")
            assert not listed.get("Contents"), prefix
    search = open_opensearch(settings)
    try:
        assert not await search.indices.exists(index=index_name(settings, leaving))
    finally:
        await search.close()
    for table in ("learner_days", "learner_day_actions", "course_days", "course_hours", "stage_counts",
                  "archive_objects", "quarantined", "dead_letters", "replays", "erased_events"):
        assert await db.fetchval(f"SELECT count(*) FROM {table} WHERE tenant = $1", leaving) == 0, table
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE tenant = $1 AND revoked_at IS NULL", leaving) == 0
    # the other tenant is whole
    from tests.support.traffic import assert_exact
    await assert_exact(settings, db, staying, kept)
    report = await reconcile(settings, key(lap_up, staying, "reader"), started)
    assert report["complete"] is True and report["archived"] == 500, report
    assert "already deleted" in run_lap("tenant", "delete", leaving, "--yes", config=lap_up.config).stdout


async def test_an_erased_learners_dead_letters_are_emptied_and_closed(lap_up, settings, db):
    """A record the database refused for the learner, kept as a dead letter: the erasure writes it again without
    the learner's events, renames their receipts and closes it; the window is complete, none dead-lettered."""
    import base64

    from lap.stream.record_format import decode_lines

    started = datetime.now(timezone.utc)
    tenant, sensor = new_tenant(lap_up)
    admin, reader = key(lap_up, tenant, "admin"), key(lap_up, tenant, "reader")
    learner = f"https://example.edu/users/refused-{tenant}"
    plain = [e for e in make_events(120) if e["type"] != "GradeEvent"]
    stored, refused = plain[:20], plain[20:30]
    for event in stored[:10] + refused:  # one learner: one partition key, so one stream record per request
        event["actor"] = {"id": learner, "type": "Person"}
    send(settings, sensor, envelopes(stored))
    await wait_for(db, tenant, {"archived": 20, "aggregated": 20})
    constraint = f"refuse_{tenant}"
    await db.execute(f"ALTER TABLE learner_days ADD CONSTRAINT {constraint} CHECK (learner <> '{learner}') NOT VALID")
    try:
        send(settings, sensor, envelopes(refused, per=10))
        for _ in range(240):
            letter = await db.fetchrow("SELECT * FROM dead_letters WHERE tenant = $1", tenant)
            if letter is not None:
                break
            await asyncio.sleep(0.5)
        assert letter is not None and letter["events"] == 10, letter
    finally:  # the cause goes; the dead letter stays until a replay or, here, the erasure
        await db.execute(f"ALTER TABLE learner_days DROP CONSTRAINT IF EXISTS {constraint}")
    reply = erase(settings, admin, learner)
    assert reply.status_code == 202, reply.text
    status = await erased(settings, admin, reply.json()["id"])
    assert status["status"] == "done" and status["counts"]["dead_lettered"] == 10, status
    letter = await db.fetchrow("SELECT * FROM dead_letters WHERE tenant = $1", tenant)
    assert letter["events"] == 0 and letter["replayed_at"] is not None and letter["replay_id"] == status["id"]
    async with AsyncExitStack() as stack:
        s3 = await open_client(stack, settings, "s3")
        body = await (await s3.get_object(Bucket=settings.archive.bucket, Key=letter["key"]))["Body"].read()
    assert decode_lines(base64.b64decode(orjson.loads(body)["data_base64"])) == []
    theirs = {e["id"] for e in stored[:10] + refused}
    assert not theirs & set((await receipts_of(settings, tenant, started)).event_id)
    report = await reconcile(settings, reader, started)
    assert report["complete"] is True and (report["erased"], report["dead_lettered"]) == (20, 0), report


async def test_an_erased_learners_refused_requests_keep_no_payload(lap_up, settings, db):
    """Refused requests kept in the quarantine that name the learner lose their payload (the refusal itself stays,
    counted); another learner's refused request is kept whole."""
    tenant, sensor = new_tenant(lap_up)
    admin, reader = key(lap_up, tenant, "admin"), key(lap_up, tenant, "reader")
    events = make_events(40, learners=4)
    learner = learner_of(tenant, events[0])
    other = next(learner_of(tenant, e) for e in events if learner_of(tenant, e) != learner)
    send(settings, sensor, envelopes(events))
    await wait_for(db, tenant, {"aggregated": 40})
    refused = {}
    apart = next(e for e in events if learner_of(tenant, e) == other and learner.encode() not in orjson.dumps(e))
    for who, event in (("theirs", events[0]), ("other", apart)):
        broken = dict(event, id=f"urn:uuid:{uuid.uuid4()}", action="NotAnAction")
        reply = httpx.post(f"{settings.api_url}/caliper", content=orjson.dumps(envelope([broken])), timeout=30,
                           headers={"Authorization": f"Bearer {sensor}", "Content-Type": "application/json"})
        assert reply.status_code in (400, 422), reply.text
        refused[who] = reply.json()["request_id"]
    cut = orjson.dumps(envelope([dict(events[0], id=f"urn:uuid:{uuid.uuid4()}")]))[:-40]  # not JSON: no hashes
    reply = httpx.post(f"{settings.api_url}/caliper", content=cut, timeout=30,
                       headers={"Authorization": f"Bearer {sensor}", "Content-Type": "application/json"})
    assert reply.status_code == 400 and learner.encode() in cut, reply.text
    refused["cut"] = reply.json()["request_id"]
    for _ in range(60):  # the quarantine's rows are written a moment after the replies
        if await db.fetchval("SELECT count(*) FROM quarantined WHERE tenant = $1", tenant) == 3:
            break
        await asyncio.sleep(0.5)
    named = dict(await db.fetch("SELECT request_id, learners FROM quarantined WHERE tenant = $1", tenant))
    assert learner_hash32(learner) in named[refused["theirs"]] and learner_hash32(other) in named[refused["other"]]
    assert learner_hash32(learner) not in named[refused["other"]] and named[refused["cut"]] is None
    before = get(settings, reader, f"/audit/quarantine/{refused['theirs']}").json()
    assert learner in before["payload"] and before["payload_erased"] is False

    reply = erase(settings, admin, learner)
    assert reply.status_code == 202, reply.text
    status = await erased(settings, admin, reply.json()["id"])
    assert status["status"] == "done" and status["counts"]["quarantined"] == 2, status

    for which in ("theirs", "cut"):
        theirs = get(settings, reader, f"/audit/quarantine/{refused[which]}")
        assert theirs.status_code == 200 and learner not in theirs.text
        kept = theirs.json()
        assert (kept["payload"], kept["payload_erased"], kept["status"]) == ("", True, 400)  # the refusal stays
        async with AsyncExitStack() as stack:
            s3 = await open_client(stack, settings, "s3")
            stored = await (await s3.get_object(Bucket=settings.archive.bucket, Key=kept["object_key"]))["Body"].read()
        assert learner.encode() not in stored and orjson.dumps(learner)[1:-1] not in stored
    assert before["title"] == get(settings, reader, f"/audit/quarantine/{refused['theirs']}").json()["title"]
    whole = get(settings, reader, f"/audit/quarantine/{refused['other']}").json()
    assert other in whole["payload"] and whole["payload_erased"] is False
    assert await db.fetchval("SELECT count(*) FROM quarantined WHERE tenant = $1", tenant) == 3
