"""The audit trail: reconcile and replay, the shards, the quarantine, the dead letters and the live pipeline."""

import asyncio
import logging
import math
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

import orjson
from fastapi import APIRouter, Query

from lap.audit.jobs import record_job
from lap.audit.reconcile import ReconcileRefused, Reconciler, Window
from lap.audit.replay import STAGES, ReplayError, check_replay_window, new_replay_id
from lap.audit.shards import consumer_state, shard_view
from lap.auth import Principal
from lap.output import queries
from lap.output.deps import OR_CSV, PROBLEMS, READER, REPLICA
from lap.output.models import (
    HOUR_CSV_COLUMNS, DeadLetter, DeadLetterPage, HourAudit, HourAudits, MinuteFigures, PipelineReport,
    QuarantinedRequest, QuarantineEntry, QuarantinePage, ReconcileReport, RefusalGroup, RefusalGroups,
    ReplayAccepted, ReplayRequest, ReplayStatus, ShardAudit, ShardPipeline,
)
from lap.output.params import (
    MAX_AUDIT_HOURS, MAX_LIMIT, as_utc, check_window, csv_response, decode_cursor, encode_cursor, zone,
)
from lap.problems import HTTPProblem

if TYPE_CHECKING:
    from lap.output.app import OutputAPI

log = logging.getLogger("lap.output")

router = APIRouter()


async def reconciled(work):
    """The result of reconcile work: a window it refuses is a 400, a store that does not answer a 503."""
    try:
        return await work
    except ReconcileRefused as exc:
        raise HTTPProblem(400, "Bad Request", str(exc)) from None
    except Exception as exc:
        log.warning("reconcile failed: %s", exc)
        raise HTTPProblem(503, "Service Unavailable", f"reconcile could not reach a store ({type(exc).__name__}); "
                          "retry later", {"Retry-After": "5"}) from None


@router.get("/audit/reconcile", response_model=ReconcileReport, responses=PROBLEMS,
            summary="What each stage holds of the events received in a window, and what is missing")
async def reconcile(
    api: "OutputAPI" = REPLICA,
    start: datetime = Query(..., description="received from (included), ISO 8601 with a timezone"),
    end: datetime = Query(..., description="received until (excluded)"),
    sensor: str | None = Query(None, max_length=2000),
    detail: str | None = Query(None, pattern="^ids$", description="`ids`: list the missing ids per stage"),
    limit: int = Query(1000, ge=1, le=10_000, description="missing ids per stage and page"),
    cursor: str | None = Query(None, max_length=4000),
    caller: Principal = READER,
):
    tenant = caller.tenant
    check_window(start, end)
    after: dict[str, str] = {}
    if cursor:
        values = decode_cursor(cursor, 3)
        if not all(isinstance(v, str) for v in values):
            raise HTTPProblem(400, "Bad Request", "cursor is not one this API handed out")
        after = dict(zip(("archive", "aggregate", "index"), values))
    result = await reconciled(Reconciler(api.settings, api.stores.pool, api.stores.s3, api.stores.search).run(
        Window(tenant, start, end, sensor), with_ids=detail == "ids", limit=limit, after=after))
    next_cursor = None
    if result.missing_ids and any(len(ids) == limit for ids in result.missing_ids.values()):
        next_cursor = encode_cursor([ids[-1] if ids else after.get(stage, "\uffff")
                                     for stage, ids in result.missing_ids.items()])
    return ReconcileReport(start=start, end=end, sensor=sensor, next_cursor=next_cursor, **result.as_dict())


@router.get("/audit/hours", response_model=HourAudits, responses=OR_CSV,
            summary="Reconcile, hour by hour: each hour's figures, for a chart or a spreadsheet")
async def audit_hours(
    api: "OutputAPI" = REPLICA,
    start: datetime = Query(..., description="received from (included); the first row is its hour"),
    end: datetime = Query(..., description="received until (excluded)"),
    format: Literal["json", "csv"] = Query("json"),
    tz: str = Query("UTC", max_length=64, description="IANA time zone whose whole hours are the rows, e.g. "
                                                      "Asia/Kolkata (default UTC)"),
    caller: Principal = READER,
):
    tenant = caller.tenant
    check_window(start, end)
    local = zone(tz)
    start, end = as_utc("start", start), as_utc("end", end)
    first = start.astimezone(local).replace(minute=0, second=0, microsecond=0).astimezone(UTC)
    if end - first > timedelta(hours=MAX_AUDIT_HOURS):
        raise HTTPProblem(400, "Bad Request", f"at most {MAX_AUDIT_HOURS} hours at a time; ask in parts")
    reconciler = Reconciler(api.settings, api.stores.pool, api.stores.s3, api.stores.search)
    starts = [first + timedelta(hours=i) for i in range(math.ceil((end - first) / timedelta(hours=1)))]
    gate = asyncio.Semaphore(4)  # a few hours at a time: each takes a few queries

    async def one(hour: datetime) -> HourAudit:
        async with gate:
            result = await reconciler.run(Window(tenant, max(hour, start), min(hour + timedelta(hours=1), end)))
        return HourAudit(hour=hour.astimezone(local),
                         **{k: v for k, v in result.as_dict().items() if k in HourAudit.model_fields})

    hours = list(await reconciled(asyncio.gather(*(one(hour) for hour in starts))))
    if format == "csv":
        rows = [h.model_dump() | {f"missing_{stage}": n for stage, n in h.missing.items()} for h in hours]
        return csv_response("reconcile-hours.csv", HOUR_CSV_COLUMNS, rows)
    return HourAudits(start=start.astimezone(local), end=end.astimezone(local), hours=hours)


@router.post("/audit/replay", response_model=ReplayAccepted, status_code=202, responses=PROBLEMS,
             summary="Replay what reconcile finds missing in a window (admin keys)")
async def replay(body: ReplayRequest, api: "OutputAPI" = REPLICA, caller: Principal = READER):
    if caller.role != "admin":
        raise HTTPProblem(403, "Forbidden", "only an admin key can replay")
    check_window(body.start, body.end)
    try:
        check_replay_window(api.settings, body.start)
    except ReplayError as exc:  # refused up front, not accepted and failed later
        raise HTTPProblem(400, "Bad Request", str(exc)) from None
    replay_id = new_replay_id()
    stages = sorted(set(body.stages), key=STAGES.index)
    window = Window(caller.tenant, body.start, body.end)
    await record_job(api.stores.pool, replay_id, window, stages, body.source)
    api.jobs.start(replay_id, window, stages, body.source)
    return ReplayAccepted(id=replay_id)


@router.get("/audit/replay/{replay_id}", response_model=ReplayStatus, responses=PROBLEMS,
            summary="A replay's progress, status and result")
async def replay_status(replay_id: str, api: "OutputAPI" = REPLICA, caller: Principal = READER):
    tenant = caller.tenant
    async with api.stores.pool.acquire() as conn:
        row = await queries.replay(conn, tenant, replay_id)
    if row is None:
        raise HTTPProblem(404, "Not Found", "no replay with this id")
    live = api.jobs.live.get(replay_id)
    return ReplayStatus(
        id=row["id"], status=row["status"], start=row["window_start"], end=row["window_end"],
        stages=list(row["stages"]), source=row["source"], requested_at=row["requested_at"],
        finished_at=row["finished_at"], progress=live if live is not None else orjson.loads(row["progress"]),
        result=None if row["result"] is None else orjson.loads(row["result"]), error=row["error"])


@router.get("/audit/shards", response_model=list[ShardAudit], responses=PROBLEMS,
            summary="Each shard's checkpoint, lag, and this tenant's events per stage")
async def audit_shards(api: "OutputAPI" = REPLICA, caller: Principal = READER):
    tenant = caller.tenant
    async with api.stores.pool.acquire() as conn:
        shards = await shard_view(conn, api.settings.stream.name)
        counts = await queries.shard_stage_counts(conn, tenant)
    by_shard: dict[str, dict[str, int]] = {}
    for c in counts:
        by_shard.setdefault(c["shard_id"], {})[c["stage"]] = c["n"]
    return [ShardAudit(shard_id=r["shard_id"], parent_ids=list(r["parent_ids"]), finished=r["finished"],
                       checkpoint=None if r["sequence_number"] is None else str(r["sequence_number"]),
                       indexed_to=None if r["indexed_to"] is None else str(r["indexed_to"]),
                       lag_ms=r["lag_ms"], counts=by_shard.get(r["shard_id"], {})) for r in shards]


@router.get("/audit/quarantine", response_model=QuarantinePage, responses=PROBLEMS,
            summary="What was refused in a window, and why")
async def audit_quarantine(
    api: "OutputAPI" = REPLICA,
    start: datetime = Query(...), end: datetime = Query(...),
    sensor: str | None = Query(None, max_length=2000), limit: int = Query(100, ge=1, le=MAX_LIMIT),
    cursor: str | None = Query(None, max_length=4000),
    caller: Principal = READER,
):
    tenant = caller.tenant
    check_window(start, end)
    after_time, after_id = start, ""
    if cursor:
        when, request_id = decode_cursor(cursor, 2)
        try:
            after_time, after_id = datetime.fromisoformat(when), str(request_id)
        except (TypeError, ValueError):
            raise HTTPProblem(400, "Bad Request", "cursor is not one this API handed out") from None
    async with api.stores.pool.acquire() as conn:
        rows = await queries.quarantine_page(conn, tenant, start, end, sensor, after_time, after_id, limit + 1)
    page = rows[:limit]
    next_cursor = encode_cursor([page[-1]["received_at"].isoformat(), page[-1]["request_id"]]) \
        if len(rows) > limit else None
    return QuarantinePage(next_cursor=next_cursor, entries=[
        QuarantineEntry(request_id=r["request_id"], sensor=r["sensor"], received_at=r["received_at"],
                        status=r["status"], title=r["title"], problems=orjson.loads(r["problems"]),
                        payload_bytes=r["payload_bytes"], object_key=r["object_key"]) for r in page])


@router.get("/pipeline", response_model=PipelineReport, responses=PROBLEMS,
            summary="The live pipeline: this tenant's events and refusals per minute, each shard, each dependency")
async def pipeline(api: "OutputAPI" = REPLICA, minutes: int = Query(15, ge=1, le=120), caller: Principal = READER):
    tenant = caller.tenant
    now = datetime.now(UTC)
    since = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    stale_after = max(30.0, 5 * api.settings.process.audit_flush_s)
    health = await api.health.report()
    async with api.stores.pool.acquire() as conn:
        accepted = await queries.accepted_per_minute(conn, tenant, since)
        refused = await queries.refused_per_minute(conn, tenant, since)
        shards = await shard_view(conn, api.settings.stream.name)
    figures = {since + timedelta(minutes=i): MinuteFigures(minute=since + timedelta(minutes=i), accepted=0,
                                                           refused={}) for i in range(minutes)}
    for r in accepted:
        if r["minute"] in figures:
            figures[r["minute"]].accepted = int(r["events"])
    for r in refused:
        if r["minute"] in figures:
            figures[r["minute"]].refused[str(r["status"])] = int(r["n"])
    return PipelineReport(
        generated_at=now, stale_after_s=stale_after, minutes=list(figures.values()), components=health.components,
        shards=[ShardPipeline(
            shard_id=r["shard_id"], node=r["consumer_node"], lag_ms=r["lag_ms"], consumer=consumer_state(r),
            index_backlog_batches=r["index_backlog"], reported_at=r["updated_at"],
            stale=not r["finished"] and (r["updated_at"] is None
                                         or (now - r["updated_at"]).total_seconds() > stale_after))
            for r in shards])


@router.get("/audit/refusals", response_model=RefusalGroups, responses=PROBLEMS,
            summary="Refusals kept in the quarantine, by sensor and reason, each with its newest sample")
async def audit_refusals(api: "OutputAPI" = REPLICA, start: datetime = Query(...), end: datetime = Query(...),
                         caller: Principal = READER):
    tenant = caller.tenant
    check_window(start, end)
    async with api.stores.pool.acquire() as conn:
        rows = await queries.refusal_groups(conn, tenant, start, end)
    groups = [RefusalGroup(sensor=r["sensor"], status=r["status"], title=r["title"], count=r["n"],
                           last_received_at=r["received_at"], sample_request_id=r["request_id"],
                           sample_problems=orjson.loads(r["problems"])) for r in rows]
    groups.sort(key=lambda g: (-g.count, g.sensor, g.status))
    return RefusalGroups(start=start, end=end, groups=groups)


@router.get("/audit/quarantine/{request_id}", response_model=QuarantinedRequest, responses=PROBLEMS,
            summary="One refused request: its problems and the payload as kept")
async def quarantined_request(request_id: str, api: "OutputAPI" = REPLICA, caller: Principal = READER):
    tenant = caller.tenant
    async with api.stores.pool.acquire() as conn:
        row = await queries.quarantined(conn, tenant, request_id)
    if row is None:
        raise HTTPProblem(404, "Not Found", "no refused request with this id")
    try:
        reply = await api.stores.s3.get_object(Bucket=api.settings.archive.bucket, Key=row["object_key"])
        async with reply["Body"] as body:
            kept = orjson.loads(await body.read())
    except api.stores.s3.exceptions.NoSuchKey:
        raise HTTPProblem(404, "Not Found", "the payload of this refusal is no longer kept (the quarantine's "
                                            "lifecycle removed it)") from None
    except Exception as exc:
        log.warning("quarantine read for %s failed: %s", request_id, exc)
        raise HTTPProblem(503, "Service Unavailable", "the archive is not reachable; retry later",
                          {"Retry-After": "5"}) from None
    return QuarantinedRequest(
        request_id=row["request_id"], sensor=row["sensor"], received_at=row["received_at"], status=row["status"],
        title=row["title"], problems=orjson.loads(row["problems"]), payload_bytes=row["payload_bytes"],
        object_key=row["object_key"], payload_truncated=kept.get("payload_truncated", False),
        payload_encoding=kept.get("payload_encoding", "utf-8"), payload=kept.get("payload", ""),
        payload_erased="payload_erased_by" in kept)


@router.get("/audit/dead-letters", response_model=DeadLetterPage, responses=PROBLEMS,
            summary="Stream records of this tenant a consumer could not process, and why")
async def audit_dead_letters(
    api: "OutputAPI" = REPLICA,
    start: datetime = Query(...), end: datetime = Query(...),
    limit: int = Query(100, ge=1, le=MAX_LIMIT), cursor: str | None = Query(None, max_length=4000),
    caller: Principal = READER,
):
    tenant = caller.tenant
    check_window(start, end)
    after = ("", -1)
    if cursor:
        shard_id, sequence = decode_cursor(cursor, 2)
        if type(shard_id) is not str or type(sequence) is not str or not sequence.isdigit():
            raise HTTPProblem(400, "Bad Request", "cursor is not one this API handed out")
        after = (shard_id, int(sequence))
    async with api.stores.pool.acquire() as conn:
        rows = await queries.dead_letters(conn, tenant, api.settings.stream.name, start, end, after[0], after[1],
                                          limit + 1)
    page = rows[:limit]
    next_cursor = encode_cursor([page[-1]["shard_id"], str(page[-1]["sequence_number"])]) \
        if len(rows) > limit else None
    return DeadLetterPage(next_cursor=next_cursor, entries=[
        DeadLetter(shard_id=r["shard_id"], sequence_number=str(r["sequence_number"]), sensor=r["sensor"],
                   received_at=r["received_at"], events=r["events"], reason=r["reason"], object_key=r["key"],
                   dead_lettered_at=r["dead_lettered_at"], replayed_at=r["replayed_at"],
                   replay_id=r["replay_id"]) for r in page])
