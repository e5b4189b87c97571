"""Every SQL statement the Output API's routes run, each scoped to the caller's tenant.

The routes pass the tenant of the key they were called with, never one from the request; the replay jobs' own SQL
is in lap/audit/, the shards' view in lap/audit/shards.py.
"""

from datetime import date, datetime
from typing import Any

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


async def learner_courses(conn, tenant: str, learner: str, course: str | None) -> list:
    """The learner's days summed per course: no course (None) means all of them."""
    return await conn.fetch(
        """SELECT course, sum(events) AS events, sum(submissions) AS submissions,
                  sum(score_count) AS score_count, sum(score_sum) AS score_sum, max(score_max) AS score_max,
                  sum(time_on_task_s) AS time_on_task_s, min(first_active) AS first_active,
                  max(last_active) AS last_active
             FROM learner_days
            WHERE tenant = $1 AND learner = $2 AND ($3::text IS NULL OR course = $3)
            GROUP BY course ORDER BY course""", tenant, learner, course)


async def learner_actions(conn, tenant: str, learner: str, course: str | None) -> list:
    """The actions are a table of their own (a row per action), so a query of their own."""
    return await conn.fetch(
        """SELECT course, action, sum(count) AS n FROM learner_day_actions
            WHERE tenant = $1 AND learner = $2 AND ($3::text IS NULL OR course = $3)
            GROUP BY course, action""", tenant, learner, course)


async def learner_days(conn, tenant: str, learner: str, first: date, last: date) -> list:
    """The learner's events per UTC day and course, `last` excluded; days without events have no row."""
    return await conn.fetch(
        """SELECT course, day, events FROM learner_days
            WHERE tenant = $1 AND learner = $2 AND day >= $3 AND day < $4""",
        tenant, learner, first, last)


async def course_learners(conn, tenant: str, course: str, sort: str, descending: bool, rows: int, q: str | None,
                          after: tuple[Any, str] | None = None) -> list:
    """Up to `rows` learners of a course in the order of `sort` (a key of COURSE_LEARNER_SORTS), ties by learner;
    `after` is the sort value and learner of the previous page's last row, a keyset so no page skips a learner."""
    expr, sql_type = COURSE_LEARNER_SORTS[sort]
    where = ""
    args: list[Any] = [tenant, course, rows, q]
    if after is not None:
        args += list(after)
        op = "<" if descending else ">"
        where = f"WHERE ({expr} {op} $5::{sql_type} OR ({expr} = $5::{sql_type} AND learner > $6))"
    order = f"{expr} {'DESC' if descending else 'ASC'}, learner ASC"
    return await conn.fetch(
        f"""SELECT * FROM (
                SELECT learner, sum(events)::bigint AS events, sum(submissions)::bigint AS submissions,
                       sum(score_sum) / nullif(sum(score_count), 0) AS score_mean,
                       sum(time_on_task_s) AS time_on_task_s, max(last_active) AS last_active
                  FROM learner_days WHERE tenant = $1 AND course = $2
                   AND ($4::text IS NULL OR strpos(lower(learner), lower($4)) > 0)
                 GROUP BY learner) AS t
            {where} ORDER BY {order} LIMIT $3""", *args)


async def courses(conn, tenant: str, after: str | None, q: str | None, rows: int) -> list:
    """The courses by IRI after `after`; events without a course (course '') are no course."""
    return await conn.fetch(
        """SELECT course, sum(events)::bigint AS events, min(day) AS first_day, max(day) AS last_day
             FROM course_days
            WHERE tenant = $1 AND course <> '' AND ($2::text IS NULL OR course > $2)
              AND ($3::text IS NULL OR strpos(lower(course), lower($3)) > 0)
            GROUP BY course ORDER BY course LIMIT $4""", tenant, after, q, rows)


async def learners(conn, tenant: str, after: str | None, q: str | None, rows: int) -> list:
    """The learners by IRI after `after`; a learner's events without a course count, but not as a course."""
    return await conn.fetch(
        """SELECT learner, count(DISTINCT nullif(course, '')) AS courses,
                  sum(events)::bigint AS events, max(last_active) AS last_active
             FROM learner_days
            WHERE tenant = $1 AND ($2::text IS NULL OR learner > $2)
              AND ($3::text IS NULL OR strpos(lower(learner), lower($3)) > 0)
            GROUP BY learner ORDER BY learner LIMIT $4""", tenant, after, q, rows)


async def course_days(conn, tenant: str, course: str, start: datetime, end: datetime) -> list:
    """Whole UTC days only: a day is in the window when its midnight is, as the aggregates are per UTC day."""
    return await conn.fetch(
        """SELECT day, sum(events)::bigint AS events, count(DISTINCT learner) AS learners
             FROM learner_days
            WHERE tenant = $1 AND course = $2
              AND day >= ($3 AT TIME ZONE 'UTC')::date + (($3 AT TIME ZONE 'UTC')::time > '00:00')::int
              AND day < ($4 AT TIME ZONE 'UTC')::date + (($4 AT TIME ZONE 'UTC')::time > '00:00')::int
            GROUP BY day ORDER BY day""", tenant, course, start, end)


async def course_learner_days(conn, tenant: str, course: str, first: date, last: date) -> list:
    """A heatmap's rows: ordered by learner, so each learner's days come together."""
    return await conn.fetch(
        """SELECT learner, day, events FROM learner_days
            WHERE tenant = $1 AND course = $2 AND day >= $3 AND day < $4
            ORDER BY learner, day""", tenant, course, first, last)


async def course_hours(conn, tenant: str, course: str, start: datetime, end: datetime) -> list:
    """UTC hours, for the caller to fold into the hours of a week in its own time zone."""
    return await conn.fetch(
        """SELECT hour, events FROM course_hours
            WHERE tenant = $1 AND course = $2 AND hour >= $3 AND hour < $4""",
        tenant, course, start, end)


async def replay(conn, tenant: str, replay_id: str):
    """The tenant in the condition: another tenant's replay id is not found, not shown."""
    return await conn.fetchrow("SELECT * FROM replays WHERE id = $1 AND tenant = $2", replay_id, tenant)


async def shard_stage_counts(conn, tenant: str) -> list:
    """The tenant's events per shard and stage, for the shards' view, which holds every tenant's."""
    return await conn.fetch(
        """SELECT shard_id, stage, sum(events)::bigint AS n FROM stage_counts WHERE tenant = $1
            GROUP BY shard_id, stage""", tenant)


async def quarantine_page(conn, tenant: str, start: datetime, end: datetime, sensor: str | None,
                          after_time: datetime, after_id: str, rows: int) -> list:
    """Refusals in receipt order, after (after_time, after_id): a keyset, as refusals may share a received_at."""
    return await conn.fetch(
        """SELECT request_id, sensor, received_at, status, title, problems, payload_bytes, object_key
             FROM quarantined
            WHERE tenant = $1 AND received_at >= $2 AND received_at < $3 AND ($4::text IS NULL OR sensor = $4)
              AND (received_at, request_id) > ($5, $6)
            ORDER BY received_at, request_id LIMIT $7""",
        tenant, start, end, sensor, after_time, after_id, rows)


async def accepted_per_minute(conn, tenant: str, since: datetime) -> list:
    """Events per minute of receipt, counted as reconcile counts them: per sensor and shard the greater of ingest's
    `acknowledged` and the consumers' `accepted`, as either may lag the other (lap/audit/reconcile.py)."""
    return await conn.fetch(
        """SELECT minute, sum(greatest(acknowledged, accepted))::bigint AS events FROM (
               SELECT received_minute AS minute,
                      sum(events) FILTER (WHERE stage = 'acknowledged') AS acknowledged,
                      sum(events) FILTER (WHERE stage = 'accepted') AS accepted
                 FROM stage_counts
                WHERE tenant = $1 AND received_minute >= $2 AND stage IN ('acknowledged', 'accepted')
                GROUP BY received_minute, sensor, shard_id) AS t
            GROUP BY minute""", tenant, since)


async def refused_per_minute(conn, tenant: str, since: datetime) -> list:
    """From the quarantine itself: every refusal has its row there."""
    return await conn.fetch(
        """SELECT date_trunc('minute', received_at) AS minute, status, count(*) AS n FROM quarantined
            WHERE tenant = $1 AND received_at >= $2 GROUP BY 1, 2""", tenant, since)


async def refusal_groups(conn, tenant: str, start: datetime, end: datetime) -> list:
    """One row per sensor, status and title, with the group's count and its newest refusal as the sample."""
    return await conn.fetch(
        """SELECT DISTINCT ON (sensor, status, title) sensor, status, title,
                  count(*) OVER (PARTITION BY sensor, status, title) AS n, received_at, request_id, problems
             FROM quarantined WHERE tenant = $1 AND received_at >= $2 AND received_at < $3
            ORDER BY sensor, status, title, received_at DESC, request_id""", tenant, start, end)


async def quarantined(conn, tenant: str, request_id: str):
    """The tenant in the condition: another tenant's request id is not found, not shown."""
    return await conn.fetchrow("SELECT * FROM quarantined WHERE request_id = $1 AND tenant = $2",
                               request_id, tenant)


async def dead_letters(conn, tenant: str, stream: str, start: datetime, end: datetime, after_shard: str,
                       after_sequence: int, rows: int) -> list:
    """Dead letters in stream order, after (after_shard, after_sequence); sequence numbers outgrow a bigint."""
    return await conn.fetch(
        """SELECT shard_id, sequence_number, sensor, received_at, events, reason, key, dead_lettered_at,
                  replayed_at, replay_id
             FROM dead_letters
            WHERE stream = $1 AND tenant = $2 AND received_at >= $3 AND received_at < $4
              AND (shard_id, sequence_number) > ($5, $6::numeric)
            ORDER BY shard_id, sequence_number LIMIT $7""",
        stream, tenant, start, end, after_shard, after_sequence, rows)


async def archive_key(conn, tenant: str, batch_id: str, received_hour: datetime) -> str | None:
    """The manifest's key of a batch's archive object: an index document keeps its batch, not the object."""
    return await conn.fetchval(
        "SELECT key FROM archive_objects WHERE batch_id = $1 AND tenant = $2 AND received_hour = $3",
        batch_id, tenant, received_hour)
