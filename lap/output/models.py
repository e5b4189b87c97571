"""The Output API's answers: one pydantic model per response shape, and the few functions that build them
from rows and index hits. OpenAPI documents them from here."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from lap.health import ComponentHealth

class Scores(BaseModel):
    count: int
    sum: float
    max: float | None
    mean: float | None


class CourseFigures(BaseModel):
    course: str | None
    events: int
    actions: dict[str, int]
    submissions: int
    scores: Scores
    time_on_task_s: float
    first_active: datetime
    last_active: datetime


class LearnerSummary(BaseModel):
    learner: str
    courses: list[CourseFigures]


class CourseLearner(BaseModel):
    learner: str
    events: int
    submissions: int
    score_mean: float | None
    time_on_task_s: float
    last_active: datetime


class CourseLearners(BaseModel):
    course: str
    learners: list[CourseLearner]
    next_cursor: str | None


class CourseEntry(BaseModel):
    course: str
    events: int
    first_day: date
    last_day: date


class CoursePage(BaseModel):
    courses: list[CourseEntry]
    next_cursor: str | None


class LearnerEntry(BaseModel):
    learner: str
    courses: int
    events: int
    last_active: datetime


class LearnerPage(BaseModel):
    learners: list[LearnerEntry]
    next_cursor: str | None


class ActivityBucket(BaseModel):
    start: datetime
    events: int
    active_learners: int


class CourseActivity(BaseModel):
    course: str
    granularity: Literal["day", "hour"]
    buckets: list[ActivityBucket]


class LearnerDays(BaseModel):
    learner: str
    days: dict[str, int]  # "YYYY-MM-DD" -> events


WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class WeekdayHours(BaseModel):
    weekday: Literal["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    hours: list[int] = Field(description="24 counts: events from 00:00 to 01:00 (in time_zone) first")


class CourseHeatmap(BaseModel):
    course: str
    time_zone: str = Field(description="the zone of hour_of_week and week; in a zone whose offset is not whole "
                                       "hours, each UTC hour counts in the local hour it starts in")
    days: list[str] = Field(description="UTC days: learners' days are kept per UTC day")
    learners: list[LearnerDays]
    hour_of_week: list[int] = Field(description="168 counts over the window's days, Monday 00-01 first (the same "
                                                "as `week`, flat)")
    week: list[WeekdayHours] = Field(description="the same counts by weekday (Monday first) and hour")


class EventHit(BaseModel):
    event_id: str
    type: str | None
    action: str | None
    actor: str | None
    object: str | None
    course: str | None
    sensor: str | None
    event_time: str | None
    received_at: str | None
    event: dict[str, Any] | None = Field(None, description="the whole event as sent: in GET /v1/events/{id} only, "
                                                          "read from the archive")


class EventPage(BaseModel):
    events: list[EventHit]
    next_cursor: str | None


class ReconcileReport(BaseModel):
    start: datetime
    end: datetime
    sensor: str | None
    accepted: int
    duplicates: int
    quarantined: int
    describes: int
    archived: int
    aggregated: int
    indexed: int
    pending: int = Field(0, description="acknowledged events the stream still holds ahead of their shard's consumer: "
                                        "on their way, not missing")
    index_pending: int = Field(0, description="archived events the index writer has still to reach (new, or "
                                              "behind an index rebuild): not missing")
    index_expired: int = Field(0, description="archived events received before retention.index_days: no longer "
                                              "expected in the index")
    missing: dict[str, int]
    retention_lost: int
    dead_lettered: int = Field(0, description="events in stream records a consumer could not process, kept aside "
                                              "(listed by /v1/audit/dead-letters) until a replay stores them: not "
                                              "missing, but the window is not complete")
    erased: int = Field(0, description="events of erased learners (DELETE /v1/learners/{iri}): taken out of every "
                                       "stage on purpose, expected in none")
    nothing_missing: bool = Field(description="no event is missing from any stage so far (some may be pending)")
    complete: bool = Field(description="every accepted event is in every stage it is expected in: nothing "
                                       "missing, pending, waiting for the index or dead-lettered")
    archive_checked_at: datetime | None = None
    missing_ids: dict[str, list[str]] | None = None
    next_cursor: str | None = None


class HourAudit(BaseModel):
    hour: datetime
    accepted: int
    duplicates: int
    quarantined: int
    archived: int
    aggregated: int
    indexed: int
    pending: int
    index_pending: int
    index_expired: int
    missing: dict[str, int]
    retention_lost: int
    dead_lettered: int
    erased: int
    nothing_missing: bool
    complete: bool


class HourAudits(BaseModel):
    start: datetime
    end: datetime
    hours: list[HourAudit]


HOUR_CSV_COLUMNS = ["hour", "accepted", "duplicates", "quarantined", "archived", "aggregated", "indexed", "pending",
                    "index_pending", "index_expired", "missing_archive", "missing_aggregate", "missing_index",
                    "retention_lost", "dead_lettered", "erased", "nothing_missing", "complete"]


class ShardAudit(BaseModel):
    shard_id: str
    parent_ids: list[str]
    finished: bool
    checkpoint: str | None
    indexed_to: str | None
    lag_ms: int | None
    counts: dict[str, int]


class QuarantineEntry(BaseModel):
    request_id: str
    sensor: str
    received_at: datetime
    status: int
    title: str
    problems: list[dict[str, Any]]
    payload_bytes: int
    object_key: str


class QuarantinePage(BaseModel):
    entries: list[QuarantineEntry]
    next_cursor: str | None


class DeadLetter(BaseModel):
    shard_id: str
    sequence_number: str
    sensor: str | None
    received_at: datetime | None
    events: int
    reason: str
    object_key: str = Field(description="the record as read from the stream, with the reason, in the archive bucket")
    dead_lettered_at: datetime
    replayed_at: datetime | None
    replay_id: str | None


class DeadLetterPage(BaseModel):
    entries: list[DeadLetter]
    next_cursor: str | None


class ReplayRequest(BaseModel):
    start: datetime
    end: datetime
    stages: list[Literal["archive", "aggregate", "index"]] = Field(..., min_length=1)
    source: Literal["archive", "stream"] = "archive"


class ReplayAccepted(BaseModel):
    id: str


class ReplayStatus(BaseModel):
    id: str
    status: Literal["running", "done", "failed"]
    start: datetime
    end: datetime
    stages: list[str]
    source: str
    requested_at: datetime
    finished_at: datetime | None
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None


class Erasure(BaseModel):
    id: str = Field(description="the erasure's job id")
    learner_hash: str | None = Field(description="sha256 of the tenant and the learner's IRI, which LAP no longer "
                                                 "keeps once the erasure is done; null for a tenant's deletion")
    status: Literal["running", "done", "failed"]
    requested_at: datetime
    requested_by: str = Field(description="the id of the key that asked for it")
    finished_at: datetime | None
    counts: dict[str, int] = Field(description="events taken out of each store (archived, aggregated, indexed, "
                                               "receipts), and the objects and rows it rewrote or deleted")
    progress: dict[str, Any]
    error: str | None
    already: bool = Field(False, description="true when this learner was erased (or was being erased) already: "
                                             "nothing new was started")


class ErasurePage(BaseModel):
    erasures: list[Erasure]


class Caller(BaseModel):
    tenant: str
    role: Literal["reader", "admin"]


class MinuteFigures(BaseModel):
    minute: datetime
    accepted: int = Field(description="events the stream acknowledged, by the minute LAP received them")
    refused: dict[str, int] = Field(description="requests refused and kept in the quarantine (400, 413, 422), by "
                                                "HTTP status")


class ShardPipeline(BaseModel):
    shard_id: str
    consumer: Literal["consuming", "waiting", "finished"]
    node: str | None = Field(description="address of the node its consumer last reported from")
    lag_ms: int | None
    index_backlog_batches: int = Field(description="committed batches of the shard not yet in the search index")
    reported_at: datetime | None
    stale: bool = Field(description="an unfinished shard whose consumer has not reported for over stale_after_s")


class PipelineReport(BaseModel):
    generated_at: datetime
    stale_after_s: float
    minutes: list[MinuteFigures] = Field(description="this tenant's last minutes, oldest first; the newest may still "
                                                     "grow (ingest replicas count for a few seconds before writing)")
    shards: list[ShardPipeline]
    components: dict[str, ComponentHealth]


class RefusalGroup(BaseModel):
    sensor: str
    status: int
    title: str
    count: int
    last_received_at: datetime
    sample_request_id: str = Field(description="the newest refusal of the group: GET /v1/audit/quarantine/{id}")
    sample_problems: list[dict[str, Any]]


class RefusalGroups(BaseModel):
    start: datetime
    end: datetime
    groups: list[RefusalGroup]


class QuarantinedRequest(QuarantineEntry):
    payload_truncated: bool = Field(description="only the first limits.quarantine_payload_bytes were kept")
    payload_encoding: Literal["utf-8", "base64"]
    payload: str
    payload_erased: bool = Field(False, description="the payload named a learner who was erased since, and is no "
                                                    "longer kept")


class LearnerActivity(BaseModel):
    learner: str
    days: list[date]
    courses: dict[str, list[int]] = Field(description="per course (\"\" for events without one), the events of "
                                                      "each of `days` (UTC days)")


def course_of(value: str) -> str | None:
    return value or None  # stored as '' when the events had no group


def summary_rows(rows, actions) -> list[CourseFigures]:
    by_course: dict[str, dict[str, int]] = {}
    for a in actions:
        by_course.setdefault(a["course"], {})[a["action"]] = int(a["n"])
    out = []
    for r in rows:
        count = int(r["score_count"])
        out.append(CourseFigures(
            course=course_of(r["course"]), events=int(r["events"]), actions=by_course.get(r["course"], {}),
            submissions=int(r["submissions"]),
            scores=Scores(count=count, sum=r["score_sum"], max=r["score_max"],
                          mean=(r["score_sum"] / count) if count else None),
            time_on_task_s=r["time_on_task_s"], first_active=r["first_active"], last_active=r["last_active"]))
    return out


def hit(found: dict[str, Any], event: dict[str, Any] | None = None) -> EventHit:
    """An index hit (or GET reply) as the API shows it; documents store neither their id nor, mostly, the actor
    (docs/decisions.md, "Index")."""
    source = found.get("_source") or {}
    actor = source.get("actor") or source.get("actor_iri") or source.get("learner")
    return EventHit(event_id=source.get("event_iri") or source.get("event_id") or found["_id"], type=source.get("type"),
                    action=source.get("action"), actor=actor, object=source.get("object"), course=source.get("course"),
                    sensor=source.get("sensor"), event_time=source.get("event_time"),
                    received_at=source.get("received_at"), event=event)
