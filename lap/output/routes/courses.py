"""The tenant's courses, and a course's learners, activity and heatmap."""

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Query

from lap.auth import Principal
from lap.output import queries
from lap.output.deps import OR_CSV, PROBLEMS, READER, REPLICA
from lap.output.models import (
    WEEKDAYS, ActivityBucket, CourseActivity, CourseEntry, CourseHeatmap, CourseLearner, CourseLearners, CoursePage,
    LearnerDays, WeekdayHours,
)
from lap.output.params import (
    MAX_CSV_ROWS, MAX_LIMIT, NEXT_CURSOR, SEARCH, TIME_ZONE, as_utc, check_window, csv_response, decode_cursor,
    encode_cursor, iri_page, next_midnight, zone,
)
from lap.output.queries import COURSE_LEARNER_SORTS, NO_SCORE
from lap.problems import HTTPProblem

if TYPE_CHECKING:
    from lap.output.app import OutputAPI

router = APIRouter()


@router.get("/course-learners", response_model=CourseLearners, responses=OR_CSV,
            summary="One row per learner of a course, sorted and paged")
async def course_learners(
    api: "OutputAPI" = REPLICA,
    course: str = Query(..., min_length=1, max_length=2000, description="course (group) IRI"),
    sort: str = Query("-events", description="events, submissions, score_mean, time_on_task_s, last_active "
                                             "or learner; a leading '-' sorts descending"),
    limit: int = Query(100, ge=1, le=MAX_LIMIT),
    cursor: str | None = Query(None, max_length=4000, description="next_cursor of the previous page"),
    q: str | None = SEARCH,
    format: Literal["json", "csv"] = Query("json", description="csv: every learner (no paging), for "
                                                               "spreadsheets"),
    caller: Principal = READER,
):
    tenant = caller.tenant
    descending = sort.startswith("-")
    key = sort.lstrip("-")
    if key not in COURSE_LEARNER_SORTS:
        raise HTTPProblem(400, "Bad Request", f"sort {sort!r} is not one of: {', '.join(COURSE_LEARNER_SORTS)} "
                                              "(with an optional leading '-')")
    sql_type = COURSE_LEARNER_SORTS[key][1]
    after: tuple[Any, str] | None = None
    if cursor and format == "json":
        value, last_learner = decode_cursor(cursor, 2)
        if sql_type == "timestamptz":
            try:
                value = datetime.fromisoformat(value)
            except (TypeError, ValueError):
                raise HTTPProblem(400, "Bad Request", "cursor is not one this API handed out") from None
        elif sql_type == "text" and not isinstance(value, str) or \
                sql_type != "text" and not isinstance(value, (int, float)):
            raise HTTPProblem(400, "Bad Request", "cursor does not match this sort; start again without it")
        after = (value, str(last_learner))
    async with api.stores.pool.acquire() as conn:
        rows = await queries.course_learners(conn, tenant, course, key, descending,
                                             MAX_CSV_ROWS + 1 if format == "csv" else limit + 1, q, after)
    if format == "csv":
        if len(rows) > MAX_CSV_ROWS:
            raise HTTPProblem(400, "Bad Request", f"the course has over {MAX_CSV_ROWS:,} learners: page through "
                                                  "them as JSON, or narrow them with q")
        return csv_response("course-learners.csv", ["learner", "events", "submissions", "score_mean",
                                                     "time_on_task_s", "last_active"], rows)
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        last = page[-1]
        value = {"events": last["events"], "submissions": last["submissions"],
                 "score_mean": last["score_mean"] if last["score_mean"] is not None else NO_SCORE,
                 "time_on_task_s": last["time_on_task_s"], "last_active": last["last_active"].isoformat(),
                 "learner": last["learner"]}[key]
        next_cursor = encode_cursor([value, last["learner"]])
    return CourseLearners(course=course, next_cursor=next_cursor, learners=[
        CourseLearner(learner=r["learner"], events=int(r["events"]), submissions=int(r["submissions"]),
                      score_mean=r["score_mean"], time_on_task_s=r["time_on_task_s"],
                      last_active=r["last_active"]) for r in page])


@router.get("/courses", response_model=CoursePage, responses=PROBLEMS,
            summary="The tenant's courses, by IRI, with their events and first and last days")
async def courses(api: "OutputAPI" = REPLICA, q: str | None = SEARCH, limit: int = Query(100, ge=1, le=MAX_LIMIT),
                  cursor: str | None = NEXT_CURSOR, caller: Principal = READER):
    page, next_cursor = await iri_page(api.stores.pool, queries.courses, caller.tenant, q, limit, cursor)
    return CoursePage(courses=[CourseEntry(**dict(r)) for r in page], next_cursor=next_cursor)


@router.get("/course-activity", response_model=CourseActivity, responses=PROBLEMS,
            summary="Events and active learners of a course per day or hour")
async def course_activity(
    api: "OutputAPI" = REPLICA,
    course: str = Query(..., min_length=1, max_length=2000),
    start: datetime = Query(..., description="event time from (included)"),
    end: datetime = Query(..., description="event time to (excluded)"),
    granularity: Literal["day", "hour"] = Query("day"),
    tz: str = TIME_ZONE,
    caller: Principal = READER,
):
    tenant = caller.tenant
    check_window(start, end)
    local = zone(tz)
    if granularity == "day" and tz == "UTC":
        # days are whole UTC days: a day is in the window when its midnight is
        async with api.stores.pool.acquire() as conn:
            rows = await queries.course_days(conn, tenant, course, start, end)
        buckets = [ActivityBucket(start=datetime(r["day"].year, r["day"].month, r["day"].day, tzinfo=UTC),
                                  events=r["events"], active_learners=r["learners"]) for r in rows]
    else:
        # hours, and days of another time zone, come from the search index (the aggregates are per UTC day)
        if granularity == "day":  # whole days of tz, as in the UTC case
            start, end = next_midnight(start, local), next_midnight(end, local)
        interval = {"calendar_interval": "1d"} if granularity == "day" else {"fixed_interval": "1h"}
        body = {"size": 0, "query": {"bool": {"filter": [
                    {"term": {"course": course}},
                    {"range": {"event_time": {"gte": as_utc("start", start).isoformat(),
                                               "lt": as_utc("end", end).isoformat()}}}]}},
                "aggs": {"buckets": {"date_histogram": {"field": "event_time", "time_zone": tz,
                                                        "min_doc_count": 1, **interval},
                                     "aggs": {"learners": {"cardinality": {"field": "learner",
                                                                           "precision_threshold": 40000}}}}}}
        reply = await api.search(tenant, body) if start < end else {}
        found = reply.get("aggregations", {}).get("buckets", {}).get("buckets", [])
        buckets = [ActivityBucket(start=datetime.fromtimestamp(b["key"] / 1000, local), events=b["doc_count"],
                                  active_learners=b["learners"]["value"]) for b in found]
    return CourseActivity(course=course, granularity=granularity, buckets=buckets)


@router.get("/course-heatmap", response_model=CourseHeatmap, responses=PROBLEMS,
            summary="Learners x days activity of a course, and its hour-of-week activity")
async def course_heatmap(
    api: "OutputAPI" = REPLICA,
    course: str = Query(..., min_length=1, max_length=2000),
    start: datetime = Query(..., description="event time from (included); whole days"),
    end: datetime = Query(..., description="event time to (excluded)"),
    tz: str = TIME_ZONE,
    caller: Principal = READER,
):
    tenant = caller.tenant
    check_window(start, end)
    local = zone(tz)
    first, last = next_midnight(start), next_midnight(end)  # the UTC days that start inside the window
    hours_from, hours_to = next_midnight(start, local), next_midnight(end, local)  # and the days of tz
    async with api.stores.pool.acquire() as conn:
        rows = await queries.course_learner_days(conn, tenant, course, first.date(), last.date())
        hours = await queries.course_hours(conn, tenant, course, hours_from, hours_to)
    learners: dict[str, dict[str, int]] = {}
    days: set[str] = set()
    for r in rows:
        day = r["day"].isoformat()
        days.add(day)
        learners.setdefault(r["learner"], {})[day] = int(r["events"])
    week = [0] * 168
    for h in hours:  # each stored (UTC) hour goes to the local hour it starts in
        at = h["hour"].astimezone(local)
        week[at.weekday() * 24 + at.hour] += int(h["events"])
    return CourseHeatmap(course=course, time_zone=tz, days=sorted(days), hour_of_week=week,
                         week=[WeekdayHours(weekday=name, hours=week[i * 24:(i + 1) * 24])
                               for i, name in enumerate(WEEKDAYS)],
                         learners=[LearnerDays(learner=k, days=v) for k, v in learners.items()])
