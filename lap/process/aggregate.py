"""Per-learner figures of one batch of stream records, computed with numpy.

A batch is turned into columns in one Python pass (``columns_from_records``),
then grouped and summed without any Python loop per event (``aggregate``).
``aggregate_python`` is the plain dict loop kept as the reference the tests
compare against, and as the baseline of ``benchmarks/aggregate.py``.

Figures are kept per (tenant, learner, course, UTC day of the event time), per
(tenant, course, day) and per (tenant, course, UTC hour). Entities
(describes) are never aggregated. A missing course is written as "" because it
is part of the tables' primary keys. Event times are UTC ending in "Z", as
ingest writes them into the record's meta.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from functools import lru_cache
from operator import attrgetter, itemgetter
from typing import Any

import numpy as np

DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000

_NUMBER = r"(\d+(?:[.,]\d+)?)"
_DURATION = re.compile(
    rf"P(?:{_NUMBER}Y)?(?:{_NUMBER}M)?(?:{_NUMBER}W)?(?:{_NUMBER}D)?"
    rf"(?:T(?:{_NUMBER}H)?(?:{_NUMBER}M)?(?:{_NUMBER}S)?)?"
)
# seconds per unit, in the pattern's group order; a year is 365 days and a month 30
_UNIT_S = (365 * 86400, 30 * 86400, 7 * 86400, 86400, 3600, 60, 1)


@lru_cache(maxsize=4096)
def duration_seconds(text: str) -> float:
    """Seconds of an ISO 8601 duration; 0 if unparseable, since ingest already checked the pattern."""
    match = _DURATION.fullmatch(text)
    if match is None:
        return 0.0
    return float(sum(float(part.replace(",", ".")) * unit
                     for part, unit in zip(match.groups(), _UNIT_S) if part is not None))


def _number(value: Any) -> float | None:
    # bool is an int subclass, but a true/false score is not a score
    return float(value) if type(value) in (int, float) else None


def _time_on_task(item: dict) -> float:
    for part in (item.get("object"), item.get("generated")):
        if type(part) is dict:
            duration = part.get("duration")
            if type(duration) is str:
                return duration_seconds(duration)
    return 0.0


def _event_figures(meta: dict, item: dict) -> tuple[bool, float | None, float | None, float]:
    """(submitted, score given, max score, time on task) of one event; shared by both paths."""
    etype = meta["type"]
    submitted = etype == "AssessmentEvent" and meta["action"] == "Submitted"
    score = max_score = None
    if etype == "GradeEvent" and meta["action"] == "Graded":
        generated = item.get("generated")
        if type(generated) is dict:
            score = _number(generated.get("scoreGiven"))
            max_score = _number(generated.get("maxScore"))
    return submitted, score, max_score, _time_on_task(item)


LEARNER_DAY_COLUMNS = ("tenant", "learner", "course", "day", "events", "submissions", "score_count", "score_sum",
                       "score_max", "max_score_sum", "time_on_task_s", "first_active", "last_active")
LEARNER_DAY_ACTION_COLUMNS = ("tenant", "learner", "course", "day", "action", "count")
COURSE_DAY_COLUMNS = ("tenant", "course", "day", "events")
COURSE_HOUR_COLUMNS = ("tenant", "course", "hour", "events")
TABLES = {
    "learner_days": LEARNER_DAY_COLUMNS,
    "learner_day_actions": LEARNER_DAY_ACTION_COLUMNS,
    "course_days": COURSE_DAY_COLUMNS,
    "course_hours": COURSE_HOUR_COLUMNS,
}


def _columns(table: str, values) -> dict[str, list]:
    return dict(zip(TABLES[table], values, strict=True))


def _transpose(table: str, rows: list[tuple]) -> dict[str, list]:
    columns = list(zip(*rows)) if rows else [()] * len(TABLES[table])
    return _columns(table, map(list, columns))


def _normal(value: Any) -> Any:
    if type(value) is float:
        return None if math.isnan(value) else round(value, 6)  # NaN is "no score", as NULL in the table
    if type(value) is datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


@dataclass
class Aggregates:
    """The aggregate tables' new figures as columns (name -> list, in table order), ready for unnest().

    Columns rather than rows because the database takes one array per column,
    and numpy makes each list in one C call. The values are plain Python:
    ``day`` a date; ``first_active``/``last_active`` and ``hour`` NAIVE datetimes in UTC
    (the SQL reads them with AT TIME ZONE 'UTC'); ``score_max`` NaN for "no
    score" (the SQL turns NaN into NULL).
    """

    learner_days: dict[str, list]
    learner_day_actions: dict[str, list]
    course_days: dict[str, list]
    course_hours: dict[str, list]

    @classmethod
    def empty(cls) -> Aggregates:
        return cls(*(_columns(table, ([] for _ in names)) for table, names in TABLES.items()))

    @classmethod
    def from_rows(cls, learner_days: list[tuple], learner_day_actions: list[tuple], course_days: list[tuple],
                  course_hours: list[tuple]) -> Aggregates:
        """From row tuples in table column order, e.g. the tables read back by the tests."""
        return cls(*(_transpose(table, rows) for table, rows in
                     zip(TABLES, (learner_days, learner_day_actions, course_days, course_hours))))

    def rows(self, table: str) -> list[tuple]:
        return list(zip(*getattr(self, table).values()))

    def normalized(self) -> dict[str, list[tuple]]:
        """Table -> sorted rows, comparable with == whichever way they were made or read back.

        Floats are rounded (numpy, Python and Postgres sum in orders that may
        differ in the last bits), NaN becomes None, and datetimes aware in UTC.
        """
        return {table: sorted(tuple(map(_normal, row)) for row in self.rows(table)) for table in TABLES}


@dataclass
class Columns:
    """One batch of events as columns; entities already dropped. Build it with columns_from_records."""

    tenant: np.ndarray       # int codes into tenants
    learner: np.ndarray      # int codes into learners
    course: np.ndarray       # int codes into courses ("" for none)
    action: np.ndarray       # int codes into actions
    time_us: np.ndarray      # event time, int64 microseconds since the epoch
    submitted: np.ndarray    # bool: AssessmentEvent Submitted
    score: np.ndarray        # float64 scoreGiven of GradeEvent Graded, NaN when none
    max_score: np.ndarray    # float64 maxScore of GradeEvent Graded, 0 when none
    duration_s: np.ndarray   # float64 time on task
    tenants: list[str]
    learners: list[str]
    courses: list[str]
    actions: list[str]

    def __len__(self) -> int:
        return len(self.tenant)


def columns_from_records(records: list[dict]) -> Columns:
    """The one per-record Python pass: everything after it works on whole columns."""
    tenants: dict[str, int] = {}
    learners: dict[str, int] = {}
    courses: dict[str, int] = {}
    actions: dict[str, int] = {}
    tenant, learner, course, action, times = [], [], [], [], []
    submitted, score, max_score, duration = [], [], [], []
    for record in records:
        meta = record["meta"]
        if meta["kind"] != "event":
            continue
        tenant.append(tenants.setdefault(meta["tenant"], len(tenants)))
        learner.append(learners.setdefault(meta["learner"], len(learners)))
        course.append(courses.setdefault(meta["course"] or "", len(courses)))
        action.append(actions.setdefault(meta["action"], len(actions)))
        times.append(meta["event_time"].removesuffix("Z"))  # numpy parses naive ISO text as UTC
        is_submission, given, most, seconds = _event_figures(meta, record["item"])
        submitted.append(is_submission)
        score.append(given)  # None becomes NaN below
        max_score.append(most or 0.0)
        duration.append(seconds)
    return Columns(
        tenant=np.array(tenant, dtype=np.int64),
        learner=np.array(learner, dtype=np.int64),
        course=np.array(course, dtype=np.int64),
        action=np.array(action, dtype=np.int64),
        time_us=np.array(times, dtype="datetime64[us]").astype(np.int64),
        submitted=np.array(submitted, dtype=bool),
        score=np.array(score, dtype=np.float64),
        max_score=np.array(max_score, dtype=np.float64),
        duration_s=np.array(duration, dtype=np.float64),
        tenants=list(tenants), learners=list(learners), courses=list(courses), actions=list(actions),
    )


def _group(*parts: tuple[np.ndarray, int]) -> tuple[np.ndarray, np.ndarray]:
    """Group number of every row (by the given (codes, number of codes) columns), and one row per group.

    The codes are combined into one int64 key; if the key space would overflow,
    the key so far is renumbered first. A key space up to twice the rows is
    numbered by marking the keys present (linear); a larger one by sorting.
    Groups are numbered in key order either way.
    """
    key, size = parts[0]
    for codes, count in parts[1:]:
        if size * count >= 2**62:
            _, key = np.unique(key, return_inverse=True)
            size = int(key.max()) + 1
        key = key * count + codes
        size *= count
    rows = len(key)
    if size <= 2 * rows:
        present = np.zeros(size, dtype=bool)
        present[key] = True
        numbers = np.cumsum(present)
        inverse = (numbers - 1)[key]
        rep = np.empty(int(numbers[-1]), dtype=np.int64)
        rep[inverse] = np.arange(rows)  # any row of a group will do: they share its codes
        return inverse, rep
    bits = rows.bit_length()
    if size << bits >= 2**63:
        _, inverse = np.unique(key, return_inverse=True)
        rep = np.empty(int(inverse.max()) + 1, dtype=np.int64)
        rep[inverse] = np.arange(rows)
        return inverse, rep
    # argsort by a plain sort of (key, row) packed into one int64: several times faster than argsort
    packed = np.sort((key << bits) | np.arange(rows))
    order = packed & ((1 << bits) - 1)
    packed >>= bits
    starts = np.empty(rows, dtype=bool)
    starts[0] = True
    np.not_equal(packed[1:], packed[:-1], out=starts[1:])
    inverse = np.empty(rows, dtype=np.int64)
    inverse[order] = np.cumsum(starts) - 1
    return inverse, order[starts]


def _calendar(units: np.ndarray, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes of the distinct days (or hours) present, in order, and each one's Python date or naive datetime.

    Only the values present: event times come from sensors, and a batch may hold
    years far apart, whose span of days would not fit in memory.
    """
    first = int(units.min())
    span = int(units.max()) - first + 1
    if span <= 2 * len(units):  # the usual batch: a few consecutive days or hours, numbered without a sort
        present = np.zeros(span, dtype=bool)
        present[units - first] = True
        numbers = np.cumsum(present) - 1
        codes, values = numbers[units - first], np.flatnonzero(present) + first
    else:
        values, codes = np.unique(units, return_inverse=True)
    objects = np.empty(len(values), dtype=object)  # one object per value, shared by reference
    as_time = values.astype(unit)
    objects[:] = (as_time if unit == "datetime64[D]" else as_time.astype("datetime64[us]")).tolist()
    return codes, objects


def _pick(values: np.ndarray, codes: np.ndarray) -> list:
    """values[codes] as a list; a single value (one tenant, one day) is just repeated, which is cheaper."""
    return [values[0]] * len(codes) if len(values) == 1 else values[codes].tolist()


def aggregate(columns: Columns) -> Aggregates:
    """No Python loop per event or per row: groups by combined integer keys, sums by bincount,
    extremes by ufunc.at, and each output column made by one tolist().

    Strings and dates come from object arrays of the few distinct values, so
    indexing them copies references instead of making new objects.
    """
    if len(columns) == 0:
        return Aggregates.empty()
    tenant, learner, course, action = columns.tenant, columns.learner, columns.course, columns.action
    tenants = np.array(columns.tenants, dtype=object)
    learners = np.array(columns.learners, dtype=object)
    courses = np.array(columns.courses, dtype=object)
    actions = np.array(columns.actions, dtype=object)
    time_us = columns.time_us
    day_code, dates = _calendar(time_us // DAY_US, "datetime64[D]")
    days = len(dates)

    # Group by learner-day and action at once. Groups come in key order, action last, so a learner-day's
    # action groups are consecutive: the learner-days are their runs, found without a second sort.
    action_inv, action_rep = _group((tenant, len(tenants)), (learner, len(learners)), (course, len(courses)),
                                    (day_code, days), (action, len(actions)))
    values = (tenants, learners, courses, dates)
    action_keys = [codes[action_rep] for codes in (tenant, learner, course, day_code)]
    new_day = np.zeros(len(action_rep), dtype=bool)
    new_day[0] = True
    for codes in action_keys:
        new_day[1:] |= codes[1:] != codes[:-1]
    day_of_action = np.cumsum(new_day) - 1
    inv, groups = day_of_action[action_inv], int(day_of_action[-1]) + 1
    events = np.bincount(inv, minlength=groups)
    submissions = np.bincount(inv[columns.submitted], minlength=groups)
    scored = ~np.isnan(columns.score)
    score_count = np.bincount(inv[scored], minlength=groups)
    score_sum = np.bincount(inv[scored], weights=columns.score[scored], minlength=groups)
    score_max = np.full(groups, np.nan)
    np.fmax.at(score_max, inv, columns.score)  # fmax skips NaN, so a group without scores stays NaN
    max_score_sum = np.bincount(inv, weights=columns.max_score, minlength=groups)
    time_on_task = np.bincount(inv, weights=columns.duration_s, minlength=groups)
    first = np.full(groups, np.iinfo(np.int64).max)
    np.minimum.at(first, inv, time_us)
    last = np.full(groups, np.iinfo(np.int64).min)
    np.maximum.at(last, inv, time_us)
    # datetimes are the dearest objects to make: a group of one event (common in a short batch) shares one
    first_active = first.view("datetime64[us]").astype(object)
    last_active = first_active.copy()
    differ = last != first
    last_active[differ] = last[differ].view("datetime64[us]").astype(object)
    learner_days = _columns("learner_days", (
        *(_pick(names, codes[new_day]) for names, codes in zip(values, action_keys)),
        events.tolist(), submissions.tolist(), score_count.tolist(), score_sum.tolist(), score_max.tolist(),
        max_score_sum.tolist(), time_on_task.tolist(), first_active.tolist(), last_active.tolist(),
    ))

    learner_day_actions = _columns("learner_day_actions", (
        *(_pick(names, codes) for names, codes in zip(values, action_keys)), _pick(actions, action[action_rep]),
        np.bincount(action_inv).tolist(),
    ))

    inv, rep = _group((tenant, len(tenants)), (course, len(courses)), (day_code, days))
    course_days = _columns("course_days", (
        _pick(tenants, tenant[rep]), _pick(courses, course[rep]), _pick(dates, day_code[rep]),
        np.bincount(inv).tolist()))

    hour_code, starts = _calendar(time_us // HOUR_US, "datetime64[h]")
    inv, rep = _group((tenant, len(tenants)), (course, len(courses)), (hour_code, len(starts)))
    course_hours = _columns("course_hours", (
        _pick(tenants, tenant[rep]), _pick(courses, course[rep]), _pick(starts, hour_code[rep]),
        np.bincount(inv).tolist()))
    return Aggregates(learner_days, learner_day_actions, course_days, course_hours)


def aggregate_records(records: list[dict]) -> Aggregates:
    return aggregate(columns_from_records(records))


def _unzip(keys: dict[tuple, Any], width: int) -> list[list]:
    # one list per position, without making a tuple per row (zip(*rows) would, and wake the GC)
    return [list(map(itemgetter(i), keys)) for i in range(width)]


@dataclass(slots=True)
class _Day:
    events: int = 0
    submissions: int = 0
    score_count: int = 0
    score_sum: float = 0.0
    score_max: float | None = None
    max_score_sum: float = 0.0
    time_on_task_s: float = 0.0
    first_active: datetime | None = None
    last_active: datetime | None = None


def aggregate_python(records: list[dict]) -> Aggregates:
    """The plain loop over dicts: the reference for aggregate() and its baseline.

    Its column lists are made straight from its dicts; ``score_max`` is None,
    not NaN, when a group has no score (both are written as NULL).
    """
    learner_days: dict[tuple, _Day] = {}
    actions: dict[tuple, int] = {}
    course_days: dict[tuple, int] = {}
    hours: dict[tuple, int] = {}
    for record in records:
        meta = record["meta"]
        if meta["kind"] != "event":
            continue
        when = datetime.fromisoformat(meta["event_time"].removesuffix("Z"))  # naive UTC, as the tables take it
        tenant, course, day = meta["tenant"], meta["course"] or "", when.date()
        key = (tenant, meta["learner"], course, day)
        row = learner_days.get(key)
        if row is None:
            row = learner_days[key] = _Day(first_active=when, last_active=when)
        submitted, score, max_score, seconds = _event_figures(meta, record["item"])
        row.events += 1
        row.submissions += submitted
        if score is not None:
            row.score_count += 1
            row.score_sum += score
            row.score_max = score if row.score_max is None else max(row.score_max, score)
        if max_score is not None:
            row.max_score_sum += max_score
        row.time_on_task_s += seconds
        row.first_active = min(row.first_active, when)
        row.last_active = max(row.last_active, when)
        action_key = (*key, meta["action"])
        actions[action_key] = actions.get(action_key, 0) + 1
        course_days[tenant, course, day] = course_days.get((tenant, course, day), 0) + 1
        hour_key = (tenant, course, when.replace(minute=0, second=0, microsecond=0))
        hours[hour_key] = hours.get(hour_key, 0) + 1
    figures = list(learner_days.values())
    return Aggregates(
        _columns("learner_days", (*_unzip(learner_days, 4),
                                  *(list(map(attrgetter(f.name), figures)) for f in fields(_Day)))),
        _columns("learner_day_actions", (*_unzip(actions, 5), list(actions.values()))),
        _columns("course_days", (*_unzip(course_days, 3), list(course_days.values()))),
        _columns("course_hours", (*_unzip(hours, 3), list(hours.values()))),
    )
