"""A learner's data as JSON lines (a subject-access request): their archived events, then their aggregates.

Each line is one JSON object with a `kind`: "event" or "entity" (the event,
or describe, as the sensor sent it, with when LAP received it and from which
sensor),
"learner_day" and "learner_day_action" (the aggregate rows), and last
"summary" (how many of each were written). The events are read from the
archive objects that may hold the learner (`archive_objects.learners`), in
the order they were received.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import date, datetime
from typing import IO, Any

import orjson

from lap.settings import Settings
from lap.sinks.archive import learner_hash32, read_object

READ_CONCURRENCY = 8


def _plain(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


async def export_learner(settings: Settings, pool, s3, tenant: str, learner: str, out: IO[bytes],
                         progress: Callable[[str, int, int], None] | None = None) -> dict[str, int]:
    """Write the learner's lines to `out`; returns the summary's counts."""
    progress = progress or (lambda step, done, total: None)
    async with pool.acquire() as conn:
        objects = [r["key"] for r in await conn.fetch(
            """SELECT key FROM archive_objects WHERE tenant = $1 AND (learners IS NULL OR $2 = ANY(learners))
                ORDER BY received_hour, key""", tenant, learner_hash32(learner))]
        days = await conn.fetch(
            """SELECT course, day, events, submissions, score_count, score_sum, score_max, max_score_sum,
                      time_on_task_s, first_active, last_active
                 FROM learner_days WHERE tenant = $1 AND learner = $2 ORDER BY day, course""", tenant, learner)
        actions = await conn.fetch(
            """SELECT course, day, action, count FROM learner_day_actions WHERE tenant = $1 AND learner = $2
                ORDER BY day, course, action""", tenant, learner)
    gate = asyncio.Semaphore(READ_CONCURRENCY)
    done = 0

    async def lines_of(key: str) -> list[dict[str, Any]]:
        nonlocal done
        async with gate:
            lines = await read_object(s3, settings, key)
        done += 1
        progress("archive", done, len(objects))
        return [line for line in lines if line["meta"].get("learner") == learner
                or (line["meta"].get("kind") == "entity" and line["meta"]["event_id"] == learner)]

    progress("archive", 0, len(objects))
    found = [line for lines in await asyncio.gather(*(lines_of(k) for k in objects)) for line in lines]
    found.sort(key=lambda line: (line["meta"]["received_at"], line["meta"]["event_id"]))
    counts = {"events": 0, "learner_days": 0, "learner_day_actions": 0}
    for line in found:
        meta = line["meta"]
        out.write(orjson.dumps({"kind": meta.get("kind", "event"), "received_at": meta["received_at"],
                                "sensor": meta.get("sensor"), "event": line["item"]}) + b"\n")
        counts["events"] += 1
    for row in days:
        out.write(orjson.dumps({"kind": "learner_day", **{k: _plain(v) for k, v in dict(row).items()}}) + b"\n")
        counts["learner_days"] += 1
    for row in actions:
        out.write(orjson.dumps({"kind": "learner_day_action", **{k: _plain(v) for k, v in dict(row).items()}}) + b"\n")
        counts["learner_day_actions"] += 1
    out.write(orjson.dumps({"kind": "summary", "tenant": tenant, "learner": learner, **counts,
                            "archive_objects_read": len(objects)}) + b"\n")
    return counts
