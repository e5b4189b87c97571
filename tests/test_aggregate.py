"""Per-learner aggregation (lap.process.aggregate): pure unit tests, no servers.

The numpy path is checked against the plain Python loop on generated batches,
and both against small hand-checked cases.
"""

from __future__ import annotations

import itertools
import math
import random
from datetime import UTC, date, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lap.caliper import iri_of
from lap.process.aggregate import (
    DAY_US,
    HOUR_US,
    TABLES,
    Aggregates,
    _calendar,
    _group,
    aggregate,
    aggregate_python,
    aggregate_records,
    columns_from_records,
    duration_seconds,
)
from lap.samples import EventFactory

_ids = itertools.count()


def record(item: dict, tenant: str = "t1") -> dict:
    """A stream record for a Caliper event, with the meta ingest would write."""
    learner = iri_of(item["actor"])
    obj = item.get("object")
    if item["type"] == "GradeEvent" and isinstance(obj, dict) and iri_of(obj.get("assignee")):
        learner = iri_of(obj["assignee"])
    return {"meta": {"event_id": item["id"], "kind": "event", "type": item["type"], "action": item["action"],
                     "tenant": tenant, "sensor": "https://lms.example.edu/sensors/lms",
                     "received_at": "2026-09-30T00:00:00.000Z", "learner": learner,
                     "course": iri_of(item.get("group")), "event_time": item["eventTime"]},
            "item": item}


def entity(n: int, tenant: str = "t1") -> dict:
    item = {"id": f"https://lms.example.edu/docs/{n}", "type": "Document", "name": "Reading"}
    return {"meta": {"event_id": item["id"], "kind": "entity", "type": "Document", "action": None,
                     "tenant": tenant, "sensor": "https://lms.example.edu/sensors/lms",
                     "received_at": "2026-09-30T00:00:00.000Z", "learner": None, "course": None,
                     "event_time": None},
            "item": item}


def mixed_batch(n: int, seed: int) -> list[dict]:
    """Factory events over two tenants, some without a group, some as IRI strings, some entities."""
    rng = random.Random(seed)
    factory = EventFactory(seed=seed, learners=60, courses=8, days=5)
    records = []
    for i, item in enumerate(factory.events(n)):
        roll = rng.random()
        if roll < 0.1:
            item.pop("group")
        elif roll < 0.2:
            item["group"] = item["group"]["id"]
        if roll > 0.9:  # whole-second and microsecond spellings, as ingest may write them
            item["eventTime"] = item["eventTime"][:19] + ("Z" if roll > 0.95 else ".123456Z")
        records.append(record(item, tenant=rng.choice(["t1", "t2"])))
        if i % 17 == 0:
            records.append(entity(i, tenant=rng.choice(["t1", "t2"])))
    return records


def event(learner: str = "u1", when: str = "2026-11-27T08:01:02.123Z", etype: str = "NavigationEvent",
          action: str = "NavigatedTo", course: str | None = "c1", tenant: str = "t1", obj=None,
          generated=None) -> dict:
    """A hand-made record: only the fields aggregation reads."""
    item = {"id": f"urn:test:{next(_ids)}", "type": etype, "action": action, "eventTime": when,
            "actor": {"id": learner}, "object": obj if obj is not None else {"id": "x"}}
    if generated is not None:
        item["generated"] = generated
    return {"meta": {"event_id": item["id"], "kind": "event", "type": etype, "action": action, "tenant": tenant,
                     "sensor": "s", "received_at": when, "learner": learner, "course": course,
                     "event_time": when},
            "item": item}


def both(records: list[dict]) -> dict[str, list[tuple]]:
    """The numpy result's normalized rows, after checking they equal the Python reference's."""
    fast = aggregate_records(records).normalized()
    assert fast == aggregate_python(records).normalized()
    return fast


def test_numpy_matches_python_on_a_realistic_batch():
    records = mixed_batch(3000, seed=7)
    result = both(records)
    events = sum(1 for r in records if r["meta"]["kind"] == "event")
    learner_days = result["learner_days"]
    # the batch really exercises what it is meant to
    assert sum(row[4] for row in learner_days) == events
    assert {row[0] for row in learner_days} == {"t1", "t2"}
    assert "" in {row[2] for row in learner_days}
    assert len({row[3] for row in learner_days}) >= 5
    assert sum(row[6] for row in learner_days) > 100  # scores
    assert sum(row[5] for row in learner_days) > 100  # submissions
    assert sum(row[10] for row in learner_days) > 0  # time on task
    assert any(row[4] > 1 for row in learner_days)  # groups of several events
    assert any(row[8] is None for row in learner_days) and any(row[8] is not None for row in learner_days)
    assert sum(row[5] for row in result["learner_day_actions"]) == events
    assert sum(row[3] for row in result["course_days"]) == events
    assert sum(row[3] for row in result["course_hours"]) == events


def test_columns_are_plain_python_lists_in_table_order():
    result = aggregate_records(mixed_batch(300, seed=3))
    for table, names in TABLES.items():
        columns = getattr(result, table)
        assert tuple(columns) == names
        assert all(type(column) is list for column in columns.values())
        assert len({len(column) for column in columns.values()}) == 1
        assert result.rows(table)[0] == tuple(column[0] for column in columns.values())
    ld = result.learner_days
    row = result.rows("learner_days")[0]
    assert [type(v) for v in row[:4]] == [str, str, str, date]
    assert [type(v) for v in row[4:11]] == [int, int, int, float, float, float, float]
    assert {type(v) for v in ld["score_max"]} == {float}  # NaN, not None, for no score
    # naive UTC datetimes, as the SQL reads them (AT TIME ZONE 'UTC')
    assert all(type(v) is datetime and v.tzinfo is None for v in ld["first_active"] + ld["last_active"])
    assert type(result.learner_day_actions["count"][0]) is int
    hours = result.course_hours["hour"]
    assert all(type(v) is datetime and v.tzinfo is None and v.minute == v.second == v.microsecond == 0 for v in hours)


def test_normalized_matches_rows_read_back_from_the_tables():
    """Postgres gives aware datetimes and NULL for no score: normalized() must not see a difference."""
    result = aggregate_records(mixed_batch(300, seed=5))

    def as_stored(value):
        if type(value) is float and math.isnan(value):
            return None
        if type(value) is datetime:
            return value.replace(tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))  # any offset, same moment
        return value

    stored = Aggregates.from_rows(*([tuple(map(as_stored, row)) for row in result.rows(table)] for table in TABLES))
    assert stored != result
    assert stored.normalized() == result.normalized()
    assert Aggregates.from_rows(*(result.rows(table) for table in TABLES)) == result


@pytest.mark.parametrize("text, seconds", [
    ("PT3000S", 3000), ("P1DT2H", 93600), ("PT1.5M", 90), ("P1W", 604800),
    ("P1Y2M", 365 * 86400 + 60 * 86400), ("PT0,5S", 0.5), ("PT1M30S", 90), ("P0D", 0), ("bogus", 0),
])
def test_duration_parsing(text, seconds):
    assert duration_seconds(text) == pytest.approx(seconds)


def test_time_on_task_prefers_the_object_then_the_generated_duration():
    records = [
        event(obj={"id": "v", "duration": "PT10S"}, generated={"id": "a", "duration": "PT99S"}),
        event(obj={"id": "v"}, generated={"id": "a", "duration": "PT1M"}),
        event(obj="https://example.edu/iri", generated={"id": "a", "duration": "P1D"}),
        event(obj={"id": "v", "duration": 5}),  # not a string: no time
    ]
    (row,) = both(records)["learner_days"]
    assert row[10] == 10 + 60 + 86400


def test_grade_event_aggregates_under_the_meta_learner():
    graded = event(learner="student", etype="GradeEvent", action="Graded",
                   obj={"id": "attempt", "assignee": "student"}, generated={"scoreGiven": 7.5, "maxScore": 10})
    graded["item"]["actor"] = {"id": "autograder"}
    (row,) = both([graded])["learner_days"]
    assert row[1] == "student"
    assert row[6:10] == (1, 7.5, 7.5, 10.0)


def test_scores_and_submissions():
    records = [
        event(etype="GradeEvent", action="Graded", generated={"scoreGiven": 3, "maxScore": 10}),
        event(etype="GradeEvent", action="Graded", generated={"scoreGiven": 9.5, "maxScore": 10}),
        event(etype="GradeEvent", action="Graded", generated={"maxScore": 10}),  # no score
        event(etype="GradeEvent", action="Graded", generated={"scoreGiven": True}),  # not a number
        event(etype="GradeEvent", action="Graded", generated="urn:score"),  # not a dict
        event(etype="GradeEvent", action="Viewed", generated={"scoreGiven": 100}),  # not Graded
        event(etype="AssessmentEvent", action="Submitted"),
        event(etype="AssessmentEvent", action="Started"),
    ]
    (row,) = both(records)["learner_days"]
    assert row[4:10] == (8, 1, 2, 12.5, 9.5, 30.0)


def test_score_max_is_nan_without_scores():
    records = [event(), event(etype="GradeEvent", action="Graded", generated={"maxScore": 10})]
    (row,) = both(records)["learner_days"]
    assert row[6:10] == (0, 0.0, None, 10.0)
    (score_max,) = aggregate_records(records).learner_days["score_max"]
    assert math.isnan(score_max)  # the SQL writes NaN as NULL


def test_groups_days_courses_and_actions():
    records = [
        event(when="2026-11-27T23:59:59.999Z"),
        event(when="2026-11-27T00:00:00Z", action="Viewed"),
        event(when="2026-11-28T00:00:00.000001Z"),
        event(course=None),
        event(learner="u2", tenant="t2"),
    ]
    result = both(records)
    first = datetime(2026, 11, 27, 0, 0, 0, tzinfo=UTC)
    assert [row[:5] + row[11:] for row in result["learner_days"]] == [
        ("t1", "u1", "", date(2026, 11, 27), 1, *[datetime(2026, 11, 27, 8, 1, 2, 123000, tzinfo=UTC)] * 2),
        ("t1", "u1", "c1", date(2026, 11, 27), 2, first, datetime(2026, 11, 27, 23, 59, 59, 999000, tzinfo=UTC)),
        ("t1", "u1", "c1", date(2026, 11, 28), 1, *[datetime(2026, 11, 28, 0, 0, 0, 1, tzinfo=UTC)] * 2),
        ("t2", "u2", "c1", date(2026, 11, 27), 1, *[datetime(2026, 11, 27, 8, 1, 2, 123000, tzinfo=UTC)] * 2),
    ]
    assert result["learner_day_actions"] == [
        ("t1", "u1", "", date(2026, 11, 27), "NavigatedTo", 1),
        ("t1", "u1", "c1", date(2026, 11, 27), "NavigatedTo", 1),
        ("t1", "u1", "c1", date(2026, 11, 27), "Viewed", 1),
        ("t1", "u1", "c1", date(2026, 11, 28), "NavigatedTo", 1),
        ("t2", "u2", "c1", date(2026, 11, 27), "NavigatedTo", 1),
    ]
    assert result["course_days"] == [
        ("t1", "", date(2026, 11, 27), 1),
        ("t1", "c1", date(2026, 11, 27), 2),
        ("t1", "c1", date(2026, 11, 28), 1),
        ("t2", "c1", date(2026, 11, 27), 1),
    ]


def test_course_hours():
    records = [
        event(when="2026-11-23T00:00:00Z"),
        event(when="2026-11-23T00:59:59.999Z"),  # the same hour
        event(when="2026-11-29T23:59:59.999Z"),  # days later, in one batch
        event(when="1969-12-28T23:30:00Z"),  # before the epoch
    ]
    assert both(records)["course_hours"] == [("t1", "c1", datetime(1969, 12, 28, 23, tzinfo=UTC), 1),
                                             ("t1", "c1", datetime(2026, 11, 23, 0, tzinfo=UTC), 2),
                                             ("t1", "c1", datetime(2026, 11, 29, 23, tzinfo=UTC), 1)]


def test_empty_batch_and_entities_only():
    empty = Aggregates.empty()
    assert empty.learner_days == {name: [] for name in TABLES["learner_days"]}
    assert empty.normalized() == {table: [] for table in TABLES}
    assert Aggregates.from_rows([], [], [], []) == empty
    assert aggregate_records([]) == empty
    assert aggregate_python([]) == empty
    entities = [entity(n) for n in range(5)]
    assert len(columns_from_records(entities)) == 0
    assert aggregate_records(entities) == empty
    assert aggregate_python(entities) == empty


def test_entities_are_never_aggregated():
    records = [event(), entity(1), event()]
    (row,) = both(records)["learner_days"]
    assert row[4] == 2
    assert aggregate(columns_from_records(records)).normalized() == aggregate_records(records[::2]).normalized()


_times = st.builds(lambda t, spec: t.isoformat(timespec=spec) + "Z",
                   st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2100, 1, 1)),
                   st.sampled_from(["seconds", "milliseconds", "microseconds"]))
_durations = st.one_of(
    st.none(), st.integers(0, 10**6), st.sampled_from(["PT3000S", "P1DT2H", "PT1.5M", "P1W", "PT0,5S", "x"]))
_numbers = st.one_of(st.none(), st.integers(-100, 100), st.floats(-1e6, 1e6, allow_nan=False), st.booleans())


@st.composite
def _records(draw) -> dict:
    if draw(st.integers(0, 9)) == 0:
        return entity(draw(st.integers(0, 3)), tenant=draw(st.sampled_from(["t1", "t2"])))
    etype, action = draw(st.sampled_from([("GradeEvent", "Graded"), ("AssessmentEvent", "Submitted"),
                                          ("AssessmentEvent", "Started"), ("MediaEvent", "Paused"),
                                          ("GradeEvent", "Viewed")]))
    obj_duration, gen_duration = draw(_durations), draw(_durations)
    generated = draw(st.one_of(st.none(), st.just("urn:x"), st.fixed_dictionaries(
        {"scoreGiven": _numbers, "maxScore": _numbers, "duration": st.just(gen_duration)})))
    return event(learner=draw(st.sampled_from(["u1", "u2", "u3"])), when=draw(_times), etype=etype, action=action,
                 course=draw(st.sampled_from([None, "c1", "c2"])), tenant=draw(st.sampled_from(["t1", "t2"])),
                 obj={"id": "o", "duration": obj_duration}, generated=generated)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_records(), max_size=30))
def test_numpy_matches_python_on_random_batches(records):
    both(records)


def test_grouping_survives_a_key_space_beyond_int64():
    a = np.array([5, 5, 2**40 - 1, 5])
    b = np.array([7, 7, 1, 8])
    c = np.array([0, 0, 2**30, 0])
    inverse, rep = _group((a, 2**40), (b, 2**40), (c, 2**31))
    assert inverse.tolist() == [0, 0, 2, 1]
    assert [(a[r], b[r], c[r]) for r in rep.tolist()] == [(5, 7, 0), (5, 8, 0), (2**40 - 1, 1, 2**30)]


@pytest.mark.parametrize("learners, days", [(5, 3), (400, 40), (2**30, 2**30)])
def test_grouping_paths_number_groups_in_key_order(learners, days):
    """Marking (small key space), packed sort (larger) and np.unique (too large to pack the row in) agree."""
    rng = np.random.default_rng(learners)
    a = rng.integers(0, min(learners, 50), 500) * (learners // min(learners, 50))
    b = rng.integers(0, min(days, 7), 500) * (days // min(days, 7))
    inverse, rep = _group((a, learners), (b, days))
    pairs = list(zip(a.tolist(), b.tolist()))
    distinct = sorted(set(pairs))
    assert inverse.tolist() == [distinct.index(pair) for pair in pairs]
    assert [pairs[r] for r in rep.tolist()] == distinct


def test_event_times_centuries_apart_in_one_batch():
    """Sensors set eventTime: a batch spanning years 1 to 9999 must not make a value per day in between."""
    records = [event(when="0001-01-01T00:00:00Z"), event(when="9999-12-31T23:59:59.999Z"),
               event(when="2026-11-27T08:00:00Z"), event(when="2026-11-27T08:30:00Z")]
    columns = columns_from_records(records)
    for units, unit in ((columns.time_us // DAY_US, "datetime64[D]"), (columns.time_us // HOUR_US, "datetime64[h]")):
        codes, values = _calendar(units, unit)  # one value per day (hour) present, not per day in between
        assert len(values) == 3 and codes.tolist() == [0, 2, 1, 1]
    result = both(records)
    assert [row[2:] for row in result["course_hours"]] == [
        (datetime(1, 1, 1, 0, tzinfo=UTC), 1), (datetime(2026, 11, 27, 8, tzinfo=UTC), 2),
        (datetime(9999, 12, 31, 23, tzinfo=UTC), 1)]
    assert [row[2:] for row in result["course_days"]] == [
        (date(1, 1, 1), 1), (date(2026, 11, 27), 2), (date(9999, 12, 31), 1)]
