"""Events from the tenant's search index: one by id (from the archive when its document does not keep the whole
event), or a search."""

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query

from lap.auth import Principal
from lap.buckets import hour_of, parse_time
from lap.output import queries
from lap.output.deps import PROBLEMS, READER, REPLICA
from lap.output.models import EventHit, EventPage, hit
from lap.output.params import MAX_LIMIT, as_utc, decode_cursor, encode_cursor
from lap.problems import HTTPProblem
from lap.sinks.archive import read_object
from lap.sinks.index import document_id, index_name

if TYPE_CHECKING:
    from lap.output.app import OutputAPI

log = logging.getLogger("lap.output")

router = APIRouter()


@router.get("/events/{event_id:path}", response_model=EventHit, responses=PROBLEMS, summary="One event")
async def event(event_id: str, api: "OutputAPI" = REPLICA, caller: Principal = READER):
    tenant = caller.tenant
    if not event_id.strip():
        raise HTTPProblem(400, "Bad Request", "give the event's id: GET /v1/events/{id}")
    try:
        reply = await api.stores.search.get(index=index_name(api.settings, tenant), id=document_id(event_id),
                                            ignore=[404])
    except Exception as exc:
        log.warning("event lookup failed: %s", exc)
        raise HTTPProblem(503, "Service Unavailable", "the search index is not reachable; retry later",
                          {"Retry-After": "5"}) from None
    source = reply.get("_source") or {}
    # the tenant's own index: a document of another tenant cannot be there (its tenant is not in the source)
    if not reply.get("found") or reply.get("_index") != index_name(api.settings, tenant):
        raise HTTPProblem(404, "Not Found", "no such event (or it is not indexed yet)")
    return hit(reply, source.get("event") or await archived_event(api, tenant, event_id, source))


async def archived_event(api: "OutputAPI", tenant: str, event_id: str, source: dict[str, Any]) -> dict[str, Any]:
    """The whole event, from the archive object of the batch the document points at."""
    received = parse_time(source["received_at"].replace("Z", "+00:00"))
    try:
        async with api.stores.pool.acquire() as conn:
            key = await queries.archive_key(conn, tenant, source["batch"], hour_of(received))
        if key is None:
            raise HTTPProblem(404, "Not Found", "the event's archive object is not in the manifest; reconcile the "
                                                "window and replay it")
        lines = await read_object(api.stores.s3, api.settings, key)
    except HTTPProblem:
        raise
    except Exception as exc:
        log.warning("archive read for %s failed: %s", event_id, exc)
        raise HTTPProblem(503, "Service Unavailable", "the archive is not reachable; retry later",
                          {"Retry-After": "5"}) from None
    for line in lines:
        if line["meta"]["event_id"] == event_id:
            return line["item"]
    raise HTTPProblem(404, "Not Found", "the event is not in its archive object; reconcile the window and "
                                        "replay it")


@router.get("/events", response_model=EventPage, responses=PROBLEMS,
            summary="Search events; newest first, paged with search_after")
async def events(
    api: "OutputAPI" = REPLICA,
    actor: str | None = Query(None, max_length=2000), type: str | None = Query(None, max_length=200),  # noqa: A002
    action: str | None = Query(None, max_length=200), object: str | None = Query(None, max_length=2000),  # noqa: A002
    group: str | None = Query(None, max_length=2000), sensor: str | None = Query(None, max_length=2000),
    start: datetime | None = Query(None, description="event time from (included), ISO 8601"),
    end: datetime | None = Query(None, description="event time to (excluded), ISO 8601"),
    limit: int = Query(100, ge=1, le=MAX_LIMIT),
    cursor: str | None = Query(None, max_length=4000),
    caller: Principal = READER,
):
    tenant = caller.tenant
    start, end = (t if t is None else as_utc(name, t if t.tzinfo else t.replace(tzinfo=UTC))
                  for name, t in (("start", start), ("end", end)))
    filters: list[dict] = []  # the tenant's own index (api.search) holds only its events
    for field, value in (("actor", actor), ("type", type), ("action", action), ("object", object),
                         ("course", group), ("sensor", sensor)):
        if value is not None:
            filters.append({"term": {field: value}})
    if start or end:
        if start and end and end <= start:
            raise HTTPProblem(400, "Bad Request", "end must be after start")
        span = {}
        if start:
            span["gte"] = start.isoformat()
        if end:
            span["lt"] = end.isoformat()
        filters.append({"range": {"event_time": span}})
    body: dict[str, Any] = {"size": limit, "query": {"bool": {"filter": filters}},
                            "sort": [{"event_time": "desc"}, {"event_id": "asc"}]}
    if cursor:
        after = decode_cursor(cursor, 2)  # the sort values of the last hit: event time (ms) and event id
        if not (isinstance(after[0], int) and not isinstance(after[0], bool) and isinstance(after[1], str)):
            raise HTTPProblem(400, "Bad Request", "cursor is not one this API handed out; start again without it")
        body["search_after"] = after
    reply = await api.search(tenant, body)
    hits = reply.get("hits", {}).get("hits", [])
    next_cursor = encode_cursor(hits[-1]["sort"]) if len(hits) == limit and "sort" in hits[-1] else None
    return EventPage(events=[hit(h) for h in hits], next_cursor=next_cursor)
