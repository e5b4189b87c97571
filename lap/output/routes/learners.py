"""A learner's figures and days, and the tenant's learners."""

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from fastapi import APIRouter, Query

from lap.auth import Principal
from lap.output import queries
from lap.output.deps import PROBLEMS, READER, REPLICA
from lap.output.models import LearnerActivity, LearnerEntry, LearnerPage, LearnerSummary, summary_rows
from lap.output.params import MAX_LIMIT, NEXT_CURSOR, SEARCH, check_window, iri_page, next_midnight
from lap.problems import HTTPProblem

if TYPE_CHECKING:
    from lap.output.app import OutputAPI

router = APIRouter()


@router.get("/learner-summary", response_model=LearnerSummary, responses=PROBLEMS,
            summary="A learner's figures for each course")
async def learner_summary(api: "OutputAPI" = REPLICA,
                          learner: str = Query(..., min_length=1, max_length=2000, description="learner IRI"),
                          course: str | None = Query(None, min_length=1, max_length=2000),
                          caller: Principal = READER):
    tenant = caller.tenant
    async with api.stores.pool.acquire() as conn:
        rows = await queries.learner_courses(conn, tenant, learner, course)
        actions = await queries.learner_actions(conn, tenant, learner, course)
    if not rows:
        raise HTTPProblem(404, "Not Found", "no events of this learner" + (" in this course" if course else ""))
    return LearnerSummary(learner=learner, courses=summary_rows(rows, actions))


@router.get("/learner-activity", response_model=LearnerActivity, responses=PROBLEMS,
            summary="A learner's events per UTC day and course")
async def learner_activity(
    api: "OutputAPI" = REPLICA,
    learner: str = Query(..., min_length=1, max_length=2000, description="learner IRI"),
    start: datetime = Query(..., description="from (included): the UTC days that start inside the window"),
    end: datetime = Query(..., description="to (excluded)"),
    caller: Principal = READER,
):
    tenant = caller.tenant
    check_window(start, end)
    first, last = next_midnight(start), next_midnight(end)
    async with api.stores.pool.acquire() as conn:
        rows = await queries.learner_days(conn, tenant, learner, first.date(), last.date())
    days = [(first + timedelta(days=i)).date() for i in range((last - first).days)]
    position = {d: i for i, d in enumerate(days)}
    courses: dict[str, list[int]] = {}
    for r in rows:
        courses.setdefault(r["course"], [0] * len(days))[position[r["day"]]] += int(r["events"])
    return LearnerActivity(learner=learner, days=days, courses=dict(sorted(courses.items())))


@router.get("/learners", response_model=LearnerPage, responses=PROBLEMS,
            summary="The tenant's learners, by IRI, with their courses, events and last activity")
async def learners(api: "OutputAPI" = REPLICA, q: str | None = SEARCH, limit: int = Query(100, ge=1, le=MAX_LIMIT),
                   cursor: str | None = NEXT_CURSOR, caller: Principal = READER):
    page, next_cursor = await iri_page(api.stores.pool, queries.learners, caller.tenant, q, limit, cursor)
    return LearnerPage(learners=[LearnerEntry(**dict(r)) for r in page], next_cursor=next_cursor)
