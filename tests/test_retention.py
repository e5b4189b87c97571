"""Retention: the sweeper deletes, store by store, what is past the `retention` settings, and nothing younger;
`lap preflight` says when the stream disagrees with them."""

from __future__ import annotations

import uuid
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone

import yaml

from lap.aws import open_client
from lap.buckets import hour_of
from lap.sinks.index import open_opensearch
from lap.sinks.store import create_pool
from tests.support.stack import run_lap
from tests.test_preflight import lines_of


async def put(s3, settings, key: str) -> None:
    await s3.put_object(Bucket=settings.archive.bucket, Key=key, Body=b"{}")


async def exists(s3, settings, key: str) -> bool:
    listed = await s3.list_objects_v2(Bucket=settings.archive.bucket, Prefix=key)
    return any(o["Key"] == key for o in listed.get("Contents", []))


async def test_the_sweeper_deletes_what_is_past_its_retention_and_nothing_younger(lap_up, settings, db):
    from lap.process.sweeper import enforce_retention

    tenant = f"ret{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    # older than any event of the session's other tests (the Caliper fixtures' are from 2016 on)
    old, young = datetime(2001, 1, 1, tzinfo=timezone.utc), now - timedelta(days=1)
    days = (now - datetime(2005, 1, 1, tzinfo=timezone.utc)).days
    a = settings.archive
    keys = {name: f"{prefix}/tenant={tenant}/{name}.json" for name, prefix in (
        ("old-quarantine", a.quarantine_prefix), ("young-quarantine", a.quarantine_prefix),
        ("old-letter", a.dead_letter_prefix), ("open-letter", a.dead_letter_prefix),
        ("old-archive", a.prefix), ("young-archive", a.prefix))}
    await db.execute("INSERT INTO tenants (name) VALUES ($1)", tenant)
    for name, when in (("old-quarantine", old), ("young-quarantine", young)):
        await db.execute(
            """INSERT INTO quarantined (request_id, tenant, sensor, received_at, status, title, problems,
                                        payload_bytes, object_key) VALUES ($1, $2, 's', $3, 400, 't', '[]', 2, $4)""",
            f"{tenant}-{name}", tenant, when, keys[name])
    for name, replayed in (("old-letter", old), ("open-letter", None)):
        await db.execute(
            """INSERT INTO dead_letters (stream, shard_id, sequence_number, tenant, sensor, received_at, events, reason,
                                         key, replayed_at) VALUES ('ret', $1, 1, $2, 's', $3, 1, 'r', $4, $5)""",
            f"{tenant}-{name}", tenant, old, keys[name], replayed)
    batch = await db.fetchval(
        """INSERT INTO batches (stream, shard_id, first_seq, last_seq, records, events, describes, duplicates)
           VALUES ('ret', $1, 1, 1, 1, 1, 0, 0) RETURNING id""", tenant)
    for name, when in (("old-archive", old), ("young-archive", young)):
        await db.execute(
            """INSERT INTO archive_objects (key, batch_id, tenant, received_hour, records, bytes)
               VALUES ($1, $2, $3, $4, 1, 2)""", keys[name], batch, tenant, hour_of(when))
    for day in (old.date(), young.date()):
        await db.execute(
            """INSERT INTO learner_days (tenant, learner, course, day, events, submissions, score_count, score_sum,
                                         max_score_sum, time_on_task_s, first_active, last_active)
               VALUES ($1, 'l', 'c', $2, 1, 0, 0, 0, 0, 0, now(), now())""", tenant, day)
        await db.execute("INSERT INTO course_days (tenant, course, day, events) VALUES ($1, 'c', $2, 1)", tenant, day)

    retention = settings.retention.model_copy(update={"archive_days": float(days), "aggregates_days": float(days)})
    others = await db.fetchval("SELECT count(*) FROM learner_days WHERE tenant <> $1", tenant)
    kept = settings.model_copy(update={"retention": retention})
    pool = await create_pool(settings)
    search = open_opensearch(settings)
    try:
        async with AsyncExitStack() as stack:
            s3 = await open_client(stack, settings, "s3")
            for key in keys.values():
                await put(s3, settings, key)
            gone = await enforce_retention(kept, pool, s3, search, now=now)
            left = {name for name, key in keys.items() if await exists(s3, settings, key)}
    finally:
        await pool.close()
        await search.close()
    assert left == {"young-quarantine", "open-letter", "young-archive"}
    assert gone["archive_objects"] == 1 and gone["quarantined"] == 1 and gone["dead_letters"] == 1
    assert gone["learner_days"] == 1 and gone["course_days"] == 1
    assert [r["request_id"] for r in await db.fetch("SELECT request_id FROM quarantined WHERE tenant = $1",
                                                      tenant)] == [f"{tenant}-young-quarantine"]
    assert [r["shard_id"] for r in await db.fetch("SELECT shard_id FROM dead_letters WHERE tenant = $1",
                                                    tenant)] == [f"{tenant}-open-letter"]
    assert [r["key"] for r in await db.fetch("SELECT key FROM archive_objects WHERE tenant = $1", tenant)] \
        == [keys["young-archive"]]
    assert [r["day"] for r in await db.fetch("SELECT day FROM learner_days WHERE tenant = $1", tenant)] \
        == [young.date()]
    # the session's own data, younger, is untouched
    assert await db.fetchval("SELECT count(*) FROM learner_days WHERE tenant <> $1", tenant) == others
    await db.execute("DELETE FROM archive_objects WHERE tenant = $1", tenant)
    await db.execute("DELETE FROM batches WHERE id = $1", batch)
    for table in ("quarantined", "dead_letters", "learner_days", "course_days"):
        await db.execute(f"DELETE FROM {table} WHERE tenant = $1", tenant)


def test_preflight_says_when_the_stream_keeps_less_than_the_settings(lap_up, tmp_path):
    ok = lines_of(run_lap("preflight", config=lap_up.config).stdout)
    assert ok["retention"] == ("ok", ok["retention"][1]) and "stream keeps 24 h" in ok["retention"][1], ok
    config = yaml.safe_load(lap_up.config.read_text())
    config["retention"] = {"stream_hours": 72}
    path = tmp_path / "lap.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_lap("preflight", config=path, check=False)
    checks = lines_of(result.stdout)
    assert result.returncode == 1 and checks["retention"][0] == "FAIL", result.stdout
    assert "the stream keeps records 24 h, retention.stream_hours says 72" in checks["retention"][1]
