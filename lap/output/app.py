"""The OutputAPI Serve deployment, mounted under `/v1`: insights and event search.

Every route takes a Bearer key with the role `reader` or `admin`, and every
query is scoped to that key's tenant: the tenant is never a parameter. IRIs
are query parameters. Errors are RFC 7807 problems, never a 5xx for bad input.

Here are the routes and their SQL; the answers' shapes are in models.py, what
routes take alike (windows, time zones, cursors, CSV) in params.py, and the
replay jobs in lap/audit/jobs.py.
"""

import asyncio
import logging
import math
from http import HTTPStatus
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import asyncpg
import opensearchpy
import orjson
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve

from lap import __version__
from lap.audit.reconcile import ReconcileRefused, Reconciler, Window
from lap.audit.shards import consumer_state, shard_view
from lap.audit.jobs import REPLAY_WATCH_S, ReplayJobs, record_job
from lap.audit.replay import STAGES, ReplayError, check_replay_window, new_replay_id
from lap.auth import KeyCache, Principal, bearer_token, declare_bearer_auth
from lap.aws import open_client
from lap.output.models import (
    ActivityBucket, Caller, CourseActivity, CourseEntry, CourseHeatmap, CourseLearner,
    CourseLearners, CoursePage, DeadLetter, DeadLetterPage, EventHit, EventPage,
    HOUR_CSV_COLUMNS, HourAudit, HourAudits, LearnerActivity, LearnerDays, LearnerEntry,
    LearnerPage, LearnerSummary, MinuteFigures, PipelineReport, QuarantineEntry, QuarantinePage,
    QuarantinedRequest, ReconcileReport, RefusalGroup, RefusalGroups, ReplayAccepted, ReplayRequest,
    ReplayStatus, ShardAudit, ShardPipeline, WEEKDAYS, WeekdayHours, hit,
    summary_rows,
)
from lap.output.params import (
    MAX_AUDIT_HOURS, MAX_CSV_ROWS, MAX_LIMIT, NEXT_CURSOR, SEARCH, TIME_ZONE,
    next_midnight, as_utc, check_window, csv_response, decode_cursor, encode_cursor,
    zone,
)
from lap.problems import PROBLEM_JSON, HTTPProblem
from lap.health import HEALTH_RESPONSES, CachedHealth, HealthReport, health_reply
from lap.settings import load_settings
from lap.web import add_offline_docs
from lap.buckets import hour_of, parse_time
from lap.sinks.archive import read_object
from lap.sinks.index import index_name, open_opensearch
from lap.sinks.store import create_pool

log = logging.getLogger("lap.output")

app = FastAPI(
    title="LAP Output API",
    version=__version__,
    description="Per-learner and per-course insights and event search, scoped to the caller's tenant.",
    docs_url=None,  # lap.web.add_offline_docs serves it without a CDN
    redoc_url=None,
)
declare_bearer_auth(app, open_paths={"/healthz"})
add_offline_docs(app)


def problem_response(problem: HTTPProblem) -> Response:
    return problem.response()


@app.exception_handler(HTTPProblem)
async def _on_problem(request: Request, exc: HTTPProblem) -> Response:
    return problem_response(exc)


@app.exception_handler(StarletteHTTPException)
async def _on_routing(request: Request, exc: StarletteHTTPException) -> Response:
    """No route or no such method: the same problem+json as every other refusal."""
    detail = str(exc.detail)
    if detail == HTTPStatus(exc.status_code).phrase:  # Starlette's own, e.g. "Not Found": say more
        detail = {404: "no route matches this path; the routes are listed in /v1/openapi.json",
                  405: f"{request.method} is not allowed on this path"}.get(exc.status_code, detail)
    return problem_response(HTTPProblem(exc.status_code, HTTPStatus(exc.status_code).phrase, detail,
                                        dict(exc.headers or {})))


@app.exception_handler(asyncpg.PostgresConnectionError)
@app.exception_handler(asyncpg.InterfaceError)
@app.exception_handler(ConnectionError)
@app.exception_handler(TimeoutError)
async def _on_store_away(request: Request, exc: Exception) -> Response:
    """A store went away after the key was checked (keys are cached): retriable, so a 503, never a 500."""
    log.warning("%s %s: a store did not answer: %s", request.method, request.url.path, type(exc).__name__)
    return problem_response(HTTPProblem(503, "Service Unavailable", "a store LAP reads did not answer; retry later",
                                        {"Retry-After": "5"}))


@app.exception_handler(asyncpg.DataError)
@app.exception_handler(OverflowError)
async def _on_out_of_range(request: Request, exc: Exception) -> Response:
    # a parameter or cursor value Postgres or datetime cannot hold (a tampered cursor, year 9999 minus an offset);
    # the exception's text names query arguments and Python values: logged, not shown
    log.info("parameter out of range: %s", exc)
    return problem_response(HTTPProblem(400, "Bad Request", "a date, number or text in the request is out of the range "
                                                        "LAP can store"))


MAX_QUERY_BYTES = 4096  # far above any real query (cursors are ~100 bytes), below the proxies' own limits
QUERY_TOO_LONG = HTTPProblem(414, "URI Too Long",
                             f"the query string is over {MAX_QUERY_BYTES} bytes; no LAP query needs that much")


@app.middleware("http")
async def _refuse_nul(request: Request, call_next):
    """A NUL character can be in no IRI, id or name, and Postgres refuses it in text: a 400 here, for every route.

    A query string over MAX_QUERY_BYTES gets a 414 here, as problem+json (behind Serve's HAProxy, HAProxy gives
    the same answer itself: lap.runner.haproxy_wrapper).
    """
    if len(request.scope.get("query_string", b"")) > MAX_QUERY_BYTES:
        return problem_response(QUERY_TOO_LONG)
    if "\x00" in request.url.path or any("\x00" in k or "\x00" in v for k, v in request.query_params.multi_items()):
        return problem_response(HTTPProblem(400, "Bad Request", "the path or a query parameter holds a NUL character"))
    return await call_next(request)


@app.exception_handler(RequestValidationError)
async def _on_bad_parameters(request: Request, exc: RequestValidationError) -> Response:
    errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors())
    return problem_response(HTTPProblem(400, "Bad Request", errors or "invalid parameters"))


_PROBLEMS = {s: {"content": {PROBLEM_JSON: {"schema": {"type": "object"}}}} for s in (400, 401, 403, 404, 503)}
_OR_CSV = _PROBLEMS | {200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                             "description": "JSON, or with format=csv a CSV file"}}


NO_SCORE = -1e308  # sorts a learner without scores below every mean (a finite value, so it fits a JSON cursor)
# sort name -> (SQL expression over the per-learner row, SQL type of its cursor value)
COURSE_LEARNER_SORTS = {
    "events": ("events", "bigint"),
    "submissions": ("submissions", "bigint"),
    "score_mean": (f"coalesce(score_mean, {NO_SCORE})", "float8"),
    "time_on_task_s": ("time_on_task_s", "float8"),
    "last_active": ("last_active", "timestamptz"),
    "learner": ("learner", "text"),
}


async def calling_reader(request: Request) -> Principal:
    """The reader or admin key's principal: every route but /healthz depends on it, and its tenant scopes
    every query. The replica object is Serve's, as for the routes' own `self`."""
    return await serve.get_replica_context().servable_object.caller(request)


READER = Depends(calling_reader)


# Everything the class uses must be defined above it: Serve pickles the class when it is decorated.
@serve.deployment  # its replicas and limits: serve_config.yaml
@serve.ingress(app)
class OutputAPI:
    def __init__(self) -> None:
        self.settings = load_settings()
        self.health = CachedHealth(self.settings)
        self._pool = None
        self._keys: KeyCache | None = None
        self._search = None
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task | None = None

    async def __del__(self) -> None:
        """Serve calls this on a graceful replica shutdown: stop the background work and close the stores.
        A replay stopped here is resumed by another replica once its heartbeat is stale."""
        if self._watcher is not None:
            self._watcher.cancel()
        if self._pool is not None:
            self._jobs.cancel()
        await self.health.checker.close()
        if self._pool is not None:
            await self._clients.aclose()
            await self._search.close()
            try:
                await asyncio.wait_for(self._pool.close(), 5)
            except TimeoutError:  # a query still running: its connection goes with the process
                self._pool.terminate()

    async def check_health(self) -> None:
        """Serve calls this every few seconds on every replica: it keeps the replay watcher running there."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_replays())

    async def _watch_replays(self) -> None:
        await self._open_when_possible()
        await self._jobs.watch()

    async def _open_when_possible(self) -> None:
        while True:
            try:
                return await self._open()
            except Exception as exc:  # Postgres away: try again soon
                log.warning("stores not open yet: %s", exc)
                await asyncio.sleep(REPLAY_WATCH_S)

    async def _open(self) -> None:
        async with self._lock:
            if self._pool is None:
                self._pool = await create_pool(self.settings)
                self._keys = KeyCache(self._pool, self.settings.auth.key_cache_ttl_s)
                self._search = open_opensearch(self.settings)
                self._clients = AsyncExitStack()
                self._s3 = await open_client(self._clients, self.settings, "s3")
                self._kinesis = await open_client(self._clients, self.settings, "kinesis")
                self._jobs = ReplayJobs(self.settings, self._pool, self._s3, self._search, self._kinesis)

    async def caller(self, request: Request) -> Principal:
        """The reader or admin key's principal; its tenant scopes every query."""
        try:
            await self._open()
            token = bearer_token(request.headers.get("authorization"))
            principal = await self._keys.principal(token) if token else None
        except Exception as exc:
            log.error("cannot check the key: %s", exc)
            raise HTTPProblem(503, "Service Unavailable", "LAP cannot check keys now; retry later",
                              {"Retry-After": "5"}) from None
        if principal is None:
            raise HTTPProblem(401, "Unauthorized", "send a reader or admin key as `Authorization: Bearer <token>`",
                              {"WWW-Authenticate": 'Bearer realm="lap", error="invalid_token"'})
        if principal.role not in ("reader", "admin"):
            raise HTTPProblem(403, "Forbidden", f"a {principal.role} key cannot read; use a reader or admin key")
        return principal

    async def search(self, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
        """A search of the tenant's own index; a 503 problem when OpenSearch cannot answer."""
        try:
            return await self._search.search(index=index_name(self.settings, tenant), body=body,
                                             ignore_unavailable=True)
        except opensearchpy.RequestError as exc:  # OpenSearch read the query and refused it: no use retrying
            log.warning("search refused: %s", exc)
            raise HTTPProblem(400, "Bad Request", "the search index refused this query; check its dates and filters") \
                from None
        except Exception as exc:
            log.warning("search failed: %s", exc)
            raise HTTPProblem(503, "Service Unavailable", "the search index is not reachable; retry later",
                              {"Retry-After": "5"}) from None

    @app.get("/healthz", response_model=HealthReport, responses=HEALTH_RESPONSES)
    async def healthz(self):
        return await health_reply(self.health)

    @app.get("/whoami", response_model=Caller, responses=_PROBLEMS, summary="The tenant and role of the key sent")
    async def whoami(self, caller: Principal = READER):
        return Caller(tenant=caller.tenant, role=caller.role)

    @app.get("/learner-summary", response_model=LearnerSummary, responses=_PROBLEMS,
             summary="A learner's figures for each course")
    async def learner_summary(self,
                              learner: str = Query(..., min_length=1, max_length=2000, description="learner IRI"),
                              course: str | None = Query(None, min_length=1, max_length=2000),
                              caller: Principal = READER):
        tenant = caller.tenant
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT course, sum(events) AS events, sum(submissions) AS submissions,
                          sum(score_count) AS score_count, sum(score_sum) AS score_sum, max(score_max) AS score_max,
                          sum(time_on_task_s) AS time_on_task_s, min(first_active) AS first_active,
                          max(last_active) AS last_active
                     FROM learner_days
                    WHERE tenant = $1 AND learner = $2 AND ($3::text IS NULL OR course = $3)
                    GROUP BY course ORDER BY course""", tenant, learner, course)
            actions = await conn.fetch(
                """SELECT course, action, sum(count) AS n FROM learner_day_actions
                    WHERE tenant = $1 AND learner = $2 AND ($3::text IS NULL OR course = $3)
                    GROUP BY course, action""", tenant, learner, course)
        if not rows:
            raise HTTPProblem(404, "Not Found", "no events of this learner" + (" in this course" if course else ""))
        return LearnerSummary(learner=learner, courses=summary_rows(rows, actions))

    @app.get("/learner-activity", response_model=LearnerActivity, responses=_PROBLEMS,
             summary="A learner's events per UTC day and course")
    async def learner_activity(
        self, learner: str = Query(..., min_length=1, max_length=2000, description="learner IRI"),
        start: datetime = Query(..., description="from (included): the UTC days that start inside the window"),
        end: datetime = Query(..., description="to (excluded)"),
        caller: Principal = READER,
    ):
        tenant = caller.tenant
        check_window(start, end)
        first, last = next_midnight(start), next_midnight(end)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT course, day, events FROM learner_days
                    WHERE tenant = $1 AND learner = $2 AND day >= $3 AND day < $4""",
                tenant, learner, first.date(), last.date())
        days = [(first + timedelta(days=i)).date() for i in range((last - first).days)]
        position = {d: i for i, d in enumerate(days)}
        courses: dict[str, list[int]] = {}
        for r in rows:
            courses.setdefault(r["course"], [0] * len(days))[position[r["day"]]] += int(r["events"])
        return LearnerActivity(learner=learner, days=days, courses=dict(sorted(courses.items())))

    @app.get("/course-learners", response_model=CourseLearners, responses=_OR_CSV,
             summary="One row per learner of a course, sorted and paged")
    async def course_learners(
        self,
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
        expr, sql_type = COURSE_LEARNER_SORTS[key]
        after = ""
        args: list[Any] = [tenant, course, MAX_CSV_ROWS + 1 if format == "csv" else limit + 1, q]
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
            args += [value, str(last_learner)]
            op = "<" if descending else ">"
            after = f"WHERE ({expr} {op} $5::{sql_type} OR ({expr} = $5::{sql_type} AND learner > $6))"
        order = f"{expr} {'DESC' if descending else 'ASC'}, learner ASC"
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"""SELECT * FROM (
                        SELECT learner, sum(events)::bigint AS events, sum(submissions)::bigint AS submissions,
                               sum(score_sum) / nullif(sum(score_count), 0) AS score_mean,
                               sum(time_on_task_s) AS time_on_task_s, max(last_active) AS last_active
                          FROM learner_days WHERE tenant = $1 AND course = $2
                           AND ($4::text IS NULL OR strpos(lower(learner), lower($4)) > 0)
                         GROUP BY learner) AS t
                    {after} ORDER BY {order} LIMIT $3""", *args)
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

    async def iri_page(self, tenant: str, sql: str, q: str | None, limit: int,
                       cursor: str | None) -> tuple[list, str | None]:
        """One page of a listing by IRI: `sql` takes tenant, the last IRI of the previous page, the search text
        and the limit ($1-$4), and returns rows whose first column is the IRI."""
        after = str(decode_cursor(cursor, 1)[0]) if cursor else None
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(sql, tenant, after, q, limit + 1)
        page = rows[:limit]
        return page, encode_cursor([page[-1][0]]) if len(rows) > limit else None

    @app.get("/courses", response_model=CoursePage, responses=_PROBLEMS,
             summary="The tenant's courses, by IRI, with their events and first and last days")
    async def courses(self, q: str | None = SEARCH, limit: int = Query(100, ge=1, le=MAX_LIMIT),
                      cursor: str | None = NEXT_CURSOR, caller: Principal = READER):
        page, next_cursor = await self.iri_page(
            caller.tenant, """SELECT course, sum(events)::bigint AS events, min(day) AS first_day, max(day) AS last_day
                          FROM course_days
                         WHERE tenant = $1 AND course <> '' AND ($2::text IS NULL OR course > $2)
                           AND ($3::text IS NULL OR strpos(lower(course), lower($3)) > 0)
                         GROUP BY course ORDER BY course LIMIT $4""", q, limit, cursor)
        return CoursePage(courses=[CourseEntry(**dict(r)) for r in page], next_cursor=next_cursor)

    @app.get("/learners", response_model=LearnerPage, responses=_PROBLEMS,
             summary="The tenant's learners, by IRI, with their courses, events and last activity")
    async def learners(self, q: str | None = SEARCH, limit: int = Query(100, ge=1, le=MAX_LIMIT),
                       cursor: str | None = NEXT_CURSOR, caller: Principal = READER):
        page, next_cursor = await self.iri_page(
            caller.tenant, """SELECT learner, count(DISTINCT nullif(course, '')) AS courses,
                               sum(events)::bigint AS events, max(last_active) AS last_active
                          FROM learner_days
                         WHERE tenant = $1 AND ($2::text IS NULL OR learner > $2)
                           AND ($3::text IS NULL OR strpos(lower(learner), lower($3)) > 0)
                         GROUP BY learner ORDER BY learner LIMIT $4""", q, limit, cursor)
        return LearnerPage(learners=[LearnerEntry(**dict(r)) for r in page], next_cursor=next_cursor)

    @app.get("/course-activity", response_model=CourseActivity, responses=_PROBLEMS,
             summary="Events and active learners of a course per day or hour")
    async def course_activity(
        self, course: str = Query(..., min_length=1, max_length=2000),
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
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(
                    """SELECT day, sum(events)::bigint AS events, count(DISTINCT learner) AS learners
                         FROM learner_days
                        WHERE tenant = $1 AND course = $2
                          AND day >= ($3 AT TIME ZONE 'UTC')::date + (($3 AT TIME ZONE 'UTC')::time > '00:00')::int
                          AND day < ($4 AT TIME ZONE 'UTC')::date + (($4 AT TIME ZONE 'UTC')::time > '00:00')::int
                        GROUP BY day ORDER BY day""", tenant, course, start, end)
            buckets = [ActivityBucket(start=datetime(r["day"].year, r["day"].month, r["day"].day, tzinfo=UTC),
                                      events=r["events"], active_learners=r["learners"]) for r in rows]
        else:
            # hours, and days of another time zone, come from the search index (the aggregates are per UTC day)
            if granularity == "day":  # whole days of tz, as in the UTC case
                start, end = next_midnight(start, local), next_midnight(end, local)
            interval = {"calendar_interval": "1d"} if granularity == "day" else {"fixed_interval": "1h"}
            body = {"size": 0, "query": {"bool": {"filter": [
                        {"term": {"tenant": tenant}}, {"term": {"course": course}},
                        {"range": {"event_time": {"gte": as_utc("start", start).isoformat(),
                                                   "lt": as_utc("end", end).isoformat()}}}]}},
                    "aggs": {"buckets": {"date_histogram": {"field": "event_time", "time_zone": tz,
                                                            "min_doc_count": 1, **interval},
                                         "aggs": {"learners": {"cardinality": {"field": "learner",
                                                                               "precision_threshold": 40000}}}}}}
            reply = await self.search(tenant, body) if start < end else {}
            found = reply.get("aggregations", {}).get("buckets", {}).get("buckets", [])
            buckets = [ActivityBucket(start=datetime.fromtimestamp(b["key"] / 1000, local), events=b["doc_count"],
                                      active_learners=b["learners"]["value"]) for b in found]
        return CourseActivity(course=course, granularity=granularity, buckets=buckets)

    @app.get("/course-heatmap", response_model=CourseHeatmap, responses=_PROBLEMS,
             summary="Learners x days activity of a course, and its hour-of-week activity")
    async def course_heatmap(
        self, course: str = Query(..., min_length=1, max_length=2000),
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
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT learner, day, events FROM learner_days
                    WHERE tenant = $1 AND course = $2 AND day >= $3 AND day < $4
                    ORDER BY learner, day""", tenant, course, first.date(), last.date())
            hours = await conn.fetch(
                """SELECT hour, events FROM course_hours
                    WHERE tenant = $1 AND course = $2 AND hour >= $3 AND hour < $4""",
                tenant, course, hours_from, hours_to)
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

    async def reconciled(self, work):
        """The result of reconcile work: a window it refuses is a 400, a store that does not answer a 503."""
        try:
            return await work
        except ReconcileRefused as exc:
            raise HTTPProblem(400, "Bad Request", str(exc)) from None
        except Exception as exc:
            log.warning("reconcile failed: %s", exc)
            raise HTTPProblem(503, "Service Unavailable", f"reconcile could not reach a store ({type(exc).__name__}); "
                              "retry later", {"Retry-After": "5"}) from None

    @app.get("/audit/reconcile", response_model=ReconcileReport, responses=_PROBLEMS,
             summary="What each stage holds of the events received in a window, and what is missing")
    async def reconcile(
        self,
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
        result = await self.reconciled(Reconciler(self.settings, self._pool, self._s3, self._search).run(
            Window(tenant, start, end, sensor), with_ids=detail == "ids", limit=limit, after=after))
        next_cursor = None
        if result.missing_ids and any(len(ids) == limit for ids in result.missing_ids.values()):
            next_cursor = encode_cursor([ids[-1] if ids else after.get(stage, "\uffff")
                                         for stage, ids in result.missing_ids.items()])
        return ReconcileReport(start=start, end=end, sensor=sensor, next_cursor=next_cursor, **result.as_dict())

    @app.get("/audit/hours", response_model=HourAudits, responses=_OR_CSV,
             summary="Reconcile, hour by hour: each hour's figures, for a chart or a spreadsheet")
    async def audit_hours(
        self,
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
        reconciler = Reconciler(self.settings, self._pool, self._s3, self._search)
        starts = [first + timedelta(hours=i) for i in range(math.ceil((end - first) / timedelta(hours=1)))]
        gate = asyncio.Semaphore(4)  # a few hours at a time: each takes a few queries

        async def one(hour: datetime) -> HourAudit:
            async with gate:
                result = await reconciler.run(Window(tenant, max(hour, start), min(hour + timedelta(hours=1), end)))
            return HourAudit(hour=hour.astimezone(local),
                             **{k: v for k, v in result.as_dict().items() if k in HourAudit.model_fields})

        hours = list(await self.reconciled(asyncio.gather(*(one(hour) for hour in starts))))
        if format == "csv":
            rows = [h.model_dump() | {f"missing_{stage}": n for stage, n in h.missing.items()} for h in hours]
            return csv_response("reconcile-hours.csv", HOUR_CSV_COLUMNS, rows)
        return HourAudits(start=start.astimezone(local), end=end.astimezone(local), hours=hours)

    @app.post("/audit/replay", response_model=ReplayAccepted, status_code=202, responses=_PROBLEMS,
              summary="Replay what reconcile finds missing in a window (admin keys)")
    async def replay(self, body: ReplayRequest, caller: Principal = READER):
        if caller.role != "admin":
            raise HTTPProblem(403, "Forbidden", "only an admin key can replay")
        check_window(body.start, body.end)
        try:
            check_replay_window(self.settings, body.start)
        except ReplayError as exc:  # refused up front, not accepted and failed later
            raise HTTPProblem(400, "Bad Request", str(exc)) from None
        replay_id = new_replay_id()
        stages = sorted(set(body.stages), key=STAGES.index)
        window = Window(caller.tenant, body.start, body.end)
        await record_job(self._pool, replay_id, window, stages, body.source)
        self._jobs.start(replay_id, window, stages, body.source)
        return ReplayAccepted(id=replay_id)

    @app.get("/audit/replay/{replay_id}", response_model=ReplayStatus, responses=_PROBLEMS,
             summary="A replay's progress, status and result")
    async def replay_status(self, replay_id: str, caller: Principal = READER):
        tenant = caller.tenant
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM replays WHERE id = $1 AND tenant = $2", replay_id, tenant)
        if row is None:
            raise HTTPProblem(404, "Not Found", "no replay with this id")
        live = self._jobs.live.get(replay_id)
        return ReplayStatus(
            id=row["id"], status=row["status"], start=row["window_start"], end=row["window_end"],
            stages=list(row["stages"]), source=row["source"], requested_at=row["requested_at"],
            finished_at=row["finished_at"], progress=live if live is not None else orjson.loads(row["progress"]),
            result=None if row["result"] is None else orjson.loads(row["result"]), error=row["error"])

    @app.get("/audit/shards", response_model=list[ShardAudit], responses=_PROBLEMS,
             summary="Each shard's checkpoint, lag, and this tenant's events per stage")
    async def audit_shards(self, caller: Principal = READER):
        tenant = caller.tenant
        async with self._pool.acquire() as conn:
            shards = await shard_view(conn, self.settings.stream.name)
            counts = await conn.fetch(
                """SELECT shard_id, stage, sum(events)::bigint AS n FROM stage_counts WHERE tenant = $1
                    GROUP BY shard_id, stage""", tenant)
        by_shard: dict[str, dict[str, int]] = {}
        for c in counts:
            by_shard.setdefault(c["shard_id"], {})[c["stage"]] = c["n"]
        return [ShardAudit(shard_id=r["shard_id"], parent_ids=list(r["parent_ids"]), finished=r["finished"],
                           checkpoint=None if r["sequence_number"] is None else str(r["sequence_number"]),
                           indexed_to=None if r["indexed_to"] is None else str(r["indexed_to"]),
                           lag_ms=r["lag_ms"], counts=by_shard.get(r["shard_id"], {})) for r in shards]

    @app.get("/audit/quarantine", response_model=QuarantinePage, responses=_PROBLEMS,
             summary="What was refused in a window, and why")
    async def audit_quarantine(
        self, start: datetime = Query(...), end: datetime = Query(...),
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
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT request_id, sensor, received_at, status, title, problems, payload_bytes, object_key
                     FROM quarantined
                    WHERE tenant = $1 AND received_at >= $2 AND received_at < $3 AND ($4::text IS NULL OR sensor = $4)
                      AND (received_at, request_id) > ($5, $6)
                    ORDER BY received_at, request_id LIMIT $7""",
                tenant, start, end, sensor, after_time, after_id, limit + 1)
        page = rows[:limit]
        next_cursor = encode_cursor([page[-1]["received_at"].isoformat(), page[-1]["request_id"]]) \
            if len(rows) > limit else None
        return QuarantinePage(next_cursor=next_cursor, entries=[
            QuarantineEntry(request_id=r["request_id"], sensor=r["sensor"], received_at=r["received_at"],
                            status=r["status"], title=r["title"], problems=orjson.loads(r["problems"]),
                            payload_bytes=r["payload_bytes"], object_key=r["object_key"]) for r in page])

    @app.get("/pipeline", response_model=PipelineReport, responses=_PROBLEMS,
             summary="The live pipeline: this tenant's events and refusals per minute, each shard, each dependency")
    async def pipeline(self, minutes: int = Query(15, ge=1, le=120), caller: Principal = READER):
        tenant = caller.tenant
        now = datetime.now(UTC)
        since = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
        stale_after = max(30.0, 5 * self.settings.process.audit_flush_s)
        health = await self.health.report()
        async with self._pool.acquire() as conn:
            accepted = await conn.fetch(
                """SELECT minute, sum(greatest(acknowledged, accepted))::bigint AS events FROM (
                       SELECT received_minute AS minute,
                              sum(events) FILTER (WHERE stage = 'acknowledged') AS acknowledged,
                              sum(events) FILTER (WHERE stage = 'accepted') AS accepted
                         FROM stage_counts
                        WHERE tenant = $1 AND received_minute >= $2 AND stage IN ('acknowledged', 'accepted')
                        GROUP BY received_minute, sensor, shard_id) AS t
                    GROUP BY minute""", tenant, since)
            refused = await conn.fetch(
                """SELECT date_trunc('minute', received_at) AS minute, status, count(*) AS n FROM quarantined
                    WHERE tenant = $1 AND received_at >= $2 GROUP BY 1, 2""", tenant, since)
            shards = await shard_view(conn, self.settings.stream.name)
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

    @app.get("/audit/refusals", response_model=RefusalGroups, responses=_PROBLEMS,
             summary="Refusals kept in the quarantine, by sensor and reason, each with its newest sample")
    async def audit_refusals(self, start: datetime = Query(...), end: datetime = Query(...),
                             caller: Principal = READER):
        tenant = caller.tenant
        check_window(start, end)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT DISTINCT ON (sensor, status, title) sensor, status, title,
                          count(*) OVER (PARTITION BY sensor, status, title) AS n, received_at, request_id, problems
                     FROM quarantined WHERE tenant = $1 AND received_at >= $2 AND received_at < $3
                    ORDER BY sensor, status, title, received_at DESC, request_id""", tenant, start, end)
        groups = [RefusalGroup(sensor=r["sensor"], status=r["status"], title=r["title"], count=r["n"],
                               last_received_at=r["received_at"], sample_request_id=r["request_id"],
                               sample_problems=orjson.loads(r["problems"])) for r in rows]
        groups.sort(key=lambda g: (-g.count, g.sensor, g.status))
        return RefusalGroups(start=start, end=end, groups=groups)

    @app.get("/audit/quarantine/{request_id}", response_model=QuarantinedRequest, responses=_PROBLEMS,
             summary="One refused request: its problems and the payload as kept")
    async def quarantined_request(self, request_id: str, caller: Principal = READER):
        tenant = caller.tenant
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM quarantined WHERE request_id = $1 AND tenant = $2",
                                      request_id, tenant)
        if row is None:
            raise HTTPProblem(404, "Not Found", "no refused request with this id")
        try:
            reply = await self._s3.get_object(Bucket=self.settings.archive.bucket, Key=row["object_key"])
            async with reply["Body"] as body:
                kept = orjson.loads(await body.read())
        except self._s3.exceptions.NoSuchKey:
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
            payload_encoding=kept.get("payload_encoding", "utf-8"), payload=kept.get("payload", ""))

    @app.get("/audit/dead-letters", response_model=DeadLetterPage, responses=_PROBLEMS,
             summary="Stream records of this tenant a consumer could not process, and why")
    async def audit_dead_letters(
        self, start: datetime = Query(...), end: datetime = Query(...),
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
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT shard_id, sequence_number, sensor, received_at, events, reason, key, dead_lettered_at,
                          replayed_at, replay_id
                     FROM dead_letters
                    WHERE stream = $1 AND tenant = $2 AND received_at >= $3 AND received_at < $4
                      AND (shard_id, sequence_number) > ($5, $6::numeric)
                    ORDER BY shard_id, sequence_number LIMIT $7""",
                self.settings.stream.name, tenant, start, end, after[0], after[1], limit + 1)
        page = rows[:limit]
        next_cursor = encode_cursor([page[-1]["shard_id"], str(page[-1]["sequence_number"])]) \
            if len(rows) > limit else None
        return DeadLetterPage(next_cursor=next_cursor, entries=[
            DeadLetter(shard_id=r["shard_id"], sequence_number=str(r["sequence_number"]), sensor=r["sensor"],
                       received_at=r["received_at"], events=r["events"], reason=r["reason"], object_key=r["key"],
                       dead_lettered_at=r["dead_lettered_at"], replayed_at=r["replayed_at"],
                       replay_id=r["replay_id"]) for r in page])

    @app.get("/events/{event_id:path}", response_model=EventHit, responses=_PROBLEMS, summary="One event")
    async def event(self, event_id: str, caller: Principal = READER):
        tenant = caller.tenant
        if not event_id.strip():
            raise HTTPProblem(400, "Bad Request", "give the event's id: GET /v1/events/{id}")
        try:
            reply = await self._search.get(index=index_name(self.settings, tenant), id=event_id, ignore=[404])
        except Exception as exc:
            log.warning("event lookup failed: %s", exc)
            raise HTTPProblem(503, "Service Unavailable", "the search index is not reachable; retry later",
                              {"Retry-After": "5"}) from None
        source = reply.get("_source") or {}
        # the tenant's own index: a document of another tenant cannot be there (its tenant is not in the source)
        if not reply.get("found") or reply.get("_index") != index_name(self.settings, tenant):
            raise HTTPProblem(404, "Not Found", "no such event (or it is not indexed yet)")
        return hit(reply, source.get("event") or await self.archived_event(tenant, reply["_id"], source))

    async def archived_event(self, tenant: str, event_id: str, source: dict[str, Any]) -> dict[str, Any]:
        """The whole event, from the archive object of the batch the document points at."""
        received = parse_time(source["received_at"].replace("Z", "+00:00"))
        try:
            async with self._pool.acquire() as conn:
                key = await conn.fetchval(
                    "SELECT key FROM archive_objects WHERE batch_id = $1 AND tenant = $2 AND received_hour = $3",
                    source["batch"], tenant, hour_of(received))
            if key is None:
                raise HTTPProblem(404, "Not Found", "the event's archive object is not in the manifest; reconcile the "
                                                "window and replay it")
            lines = await read_object(self._s3, self.settings, key)
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

    @app.get("/events", response_model=EventPage, responses=_PROBLEMS,
             summary="Search events; newest first, paged with search_after")
    async def events(
        self,
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
        filters: list[dict] = [{"term": {"tenant": tenant}}]
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
        reply = await self.search(tenant, body)
        hits = reply.get("hits", {}).get("hits", [])
        next_cursor = encode_cursor(hits[-1]["sort"]) if len(hits) == limit and "sort" in hits[-1] else None
        return EventPage(events=[hit(h) for h in hits], next_cursor=next_cursor)

