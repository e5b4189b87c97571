"""Caliper validation (lap.caliper): pure unit tests, no servers.

The Caliper 1.2 conformance fixtures (the spec's own, valid and invalid) are in
``tests/fixtures/caliper``; the Caliper 1.1 fixtures are in
``tests/fixtures/caliper_v1p1``.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lap.caliper import (
    CALIPER_V1P1,
    CALIPER_V1P2,
    SUPPORTED_VERSIONS,
    CaliperError,
    Envelope,
    Item,
    ItemProblem,
    parse_envelope,
)
from lap.caliper import models

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "caliper"
V1P2_DIR = FIXTURES / "v1p2"
INVALID_DIR = FIXTURES / "v1p2-invalid"
V1P1_DIR = ROOT / "tests" / "fixtures" / "caliper_v1p1"
TOOL_LAUNCH_EXT = f"{CALIPER_V1P1}/ToolLaunchProfile-extension"

def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.json") if "EndpointConfig" not in p.name)


def envelope(*items, version: str = CALIPER_V1P2, **override) -> dict:
    env = {
        "sensor": "https://example.edu/sensors/1",
        "sendTime": "2018-11-15T10:15:01.000Z",
        "dataVersion": version,
        "data": list(items),
    }
    env.update(override)
    return env


def body(doc) -> bytes:
    return json.dumps(doc).encode()


def wrap_raw(raw: bytes, version: str = CALIPER_V1P2) -> bytes:
    """An envelope around an item given as raw bytes (works for items that are not even JSON)."""
    head = json.dumps(envelope(version=version))[:-3]  # ... "data": [
    return head.encode() + b"[" + raw + b"]}"


def fixture(name: str, folder: Path = V1P2_DIR) -> dict:
    return orjson.loads((folder / name).read_bytes())


def refused(doc_or_bytes) -> CaliperError:
    raw = doc_or_bytes if isinstance(doc_or_bytes, bytes) else body(doc_or_bytes)
    with pytest.raises(CaliperError) as info:
        parse_envelope(raw)
    return info.value


def as_version(item: dict, version: str) -> dict:
    """The item with its @context set to a Caliper version (or removed with None)."""
    item = copy.deepcopy(item)
    item.pop("@context", None)
    if version is not None:
        item["@context"] = version
    return item


# --- Caliper 1.2 conformance fixtures ---------------------------------------


@pytest.mark.parametrize("path", _files(V1P2_DIR), ids=lambda p: p.stem)
def test_every_v1p2_fixture_is_accepted(path: Path):
    raw = path.read_bytes()
    if path.name.startswith("caliperEnvelope"):
        result = parse_envelope(raw)
        expected = orjson.loads(raw)["data"]
    else:
        result = parse_envelope(wrap_raw(raw))
        expected = [orjson.loads(raw)]
    assert isinstance(result, Envelope)
    assert [item.doc for item in result.items] == expected
    for item in result.items:
        is_event = item.type == "Event" or item.type.endswith("Event")
        assert item.kind == ("event" if is_event else "entity")
        if is_event:
            assert item.action == item.doc["action"]
            assert item.event_time is not None and item.event_time.tzinfo is not None
            assert item.learner
        else:
            assert item.action is None and item.learner is None and item.event_time is None


@pytest.mark.parametrize("path", _files(INVALID_DIR), ids=lambda p: p.stem)
def test_every_invalid_fixture_is_refused_inside_an_envelope(path: Path):
    error = refused(wrap_raw(path.read_bytes()))
    assert error.status == 400
    assert any(p.index == 0 and p.path.startswith("$.data[0]") for p in error.problems), error.problems
    assert all(isinstance(p, ItemProblem) and p.message for p in error.problems)


def test_grade_event_learner_is_the_graded_attempts_assignee():
    item = parse_envelope(wrap_raw((V1P2_DIR / "caliperEventGradeGraded.json").read_bytes())).items[0]
    assert item.kind == "event" and item.type == "GradeEvent" and item.action == "Graded"
    assert item.doc["actor"]["id"] == "https://example.edu/autograder"
    assert item.learner == "https://example.edu/users/554433"
    assert item.course == "https://example.edu/terms/201601/courses/7/sections/1"
    assert item.event_time == datetime(2016, 11, 15, 10, 57, 6, tzinfo=timezone.utc)


def test_grade_event_without_an_attempt_object_falls_back_to_the_actor():
    doc = fixture("caliperEventGradeGraded.json")
    doc["object"] = doc["object"]["id"]
    assert parse_envelope(body(envelope(doc))).items[0].learner == "https://example.edu/autograder"


@pytest.mark.parametrize("score", [1.5e308, -2e15, 1e16])
def test_decimals_beyond_1e15_are_refused(score: float):
    """Sums of such scores would overflow the aggregates downstream (and no real score is that big)."""
    doc = fixture("caliperEventGradeGraded.json")
    doc["generated"]["scoreGiven"] = score
    error = refused(body(envelope(doc)))
    assert any(p.path == "$.data[0].generated.scoreGiven" and "1e15" in p.message for p in error.problems)
    doc["generated"]["scoreGiven"] = 1e15
    assert parse_envelope(body(envelope(doc))).items[0].doc["generated"]["scoreGiven"] == 1e15


def test_thinned_event_gives_learner_and_course_from_iris():
    item = parse_envelope(wrap_raw((V1P2_DIR / "caliperEventForumSubscribedThinned.json").read_bytes())).items[0]
    assert (item.kind, item.action) == ("event", "Subscribed")
    assert item.learner == "https://example.edu/users/554433"
    assert item.course == "https://example.edu/terms/201801/courses/7/sections/1"
    assert item.id == "urn:uuid:a2f41f9c-d57d-4400-b3fe-716b9026334e"


def test_session_timed_out_learner_is_the_software_actor_and_no_course():
    item = parse_envelope(wrap_raw((V1P2_DIR / "caliperEventSessionTimedOut.json").read_bytes())).items[0]
    assert item.learner == "https://example.edu" and item.course is None


def test_mixed_envelope_keeps_order_and_kinds():
    result = parse_envelope((V1P2_DIR / "caliperEnvelopeMixedBatch.json").read_bytes())
    assert [(i.index, i.kind) for i in result.items] == [
        (0, "entity"), (1, "entity"), (2, "entity"), (3, "entity"), (4, "event"), (5, "event"), (6, "event"),
    ]
    assert result.items[0].type == "Person" and result.items[0].id == "https://example.edu/users/554433"
    assert result.sensor == "https://example.edu/sensors/1"
    assert result.data_version == CALIPER_V1P2
    assert result.send_time.tzinfo is timezone.utc


def test_describes_without_id_are_accepted_with_an_empty_id():
    items = parse_envelope(body(envelope(fixture("caliperEntityTextPositionSelector.json"),
                                          fixture("caliperIdentifierSystemIdentifier.json")))).items
    assert [(i.kind, i.type, i.id) for i in items] == [
        ("entity", "TextPositionSelector", ""), ("entity", "SystemIdentifier", ""),
    ]


def test_public_base_models_agree_with_the_fast_validator():
    validator = models.public_validator(models.V1P2)
    docs = [orjson.loads(p.read_bytes()) for p in _files(V1P2_DIR) if not p.name.startswith("caliperEnvelope")]
    built = validator.validate_python(docs)
    assert [type(m).__name__ for m in built] == [d["type"] for d in docs]
    assert isinstance(built[0], models.CaliperModel)
    for path in _files(INVALID_DIR):
        try:
            doc = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError:
            continue
        if "UnknownContext" in path.name:
            continue  # a context rule, not a model rule
        with pytest.raises(Exception):
            validator.validate_python([doc])


def test_every_type_has_a_public_model():
    for model_set in (models.V1P1, models.V1P2):
        registry = model_set.registry
        assert set(model_set.models) == set(registry.entities) | set(registry.events)
        for name, model in model_set.models.items():
            assert issubclass(model, models.CaliperModel) and model.__name__ == name
    assert "OutcomeEvent" in models.V1P1.models and "OutcomeEvent" not in models.V1P2.models
    assert "ToolLaunchEvent" in models.V1P2.models and "ToolLaunchEvent" not in models.V1P1.models
    navigation = models.build_model(models.V1P2.models["NavigationEvent"])
    assert navigation.model_fields["action"].alias == "action"
    assert navigation.model_fields["context"].alias == "@context"


# --- Caliper 1.1 --------------------------------------------------------------


@pytest.mark.parametrize("path", _files(V1P1_DIR), ids=lambda p: p.stem)
def test_v1p1_fixtures_are_accepted_as_caliper_1_1(path: Path):
    doc = orjson.loads(path.read_bytes())
    result = parse_envelope(body(doc if "sensor" in doc else envelope(doc, version=CALIPER_V1P1)))
    assert result.data_version == CALIPER_V1P1
    assert result.items and all(isinstance(i, Item) for i in result.items)


def test_v1p1_outcome_event_learner_is_the_attempts_assignee():
    outcome = fixture("caliperEventOutcomeGraded.json", V1P1_DIR)
    item = parse_envelope(body(envelope(outcome, version=CALIPER_V1P1))).items[0]
    assert item.learner == "https://example.edu/users/554433"


def v1p1_and_v1p2(item: dict) -> tuple[bytes, bytes]:
    """The same item sent as Caliper 1.1 and as Caliper 1.2."""
    return (
        body(envelope(as_version(item, CALIPER_V1P1), version=CALIPER_V1P1)),
        body(envelope(as_version(item, CALIPER_V1P2), version=CALIPER_V1P2)),
    )


def test_deprecated_1_1_types_are_valid_in_1_1_and_unknown_in_1_2():
    for name in ("caliperEventOutcomeGraded.json", "caliperEventReadingViewedEpub.json"):
        as_11, as_12 = v1p1_and_v1p2(fixture(name, V1P1_DIR))
        parse_envelope(as_11)
        error = refused(as_12)
        assert error.status == 400
        assert "it exists in Caliper 1.1" in error.problems[0].message or "EpubChapter" in error.problems[0].message


def test_deprecated_1_1_actions_are_valid_in_1_1_and_refused_in_1_2():
    media = fixture("caliperEventMediaPaused.json", V1P1_DIR)
    media["action"] = "Rewound"
    annotation = fixture("caliperEventAnnotationBookmarked.json", V1P1_DIR)
    annotation["action"] = "Liked"
    for item, event_type in ((media, "MediaEvent"), (annotation, "AnnotationEvent")):
        as_11, as_12 = v1p1_and_v1p2(item)
        assert parse_envelope(as_11).items[0].action == item["action"]
        problem = refused(as_12).problems[0]
        assert problem.path == "$.data[0].action"
        assert problem.message.startswith(f"action '{item['action']}' is not allowed for {event_type}; allowed: ")


def test_referrer_is_any_entity_in_1_1_but_narrowed_in_1_2():
    session = fixture("caliperEventSessionTimedOut.json", V1P1_DIR)
    session["referrer"] = {"id": "https://example.edu/users/554433", "type": "Person"}
    as_11, as_12 = v1p1_and_v1p2(session)
    parse_envelope(as_11)
    problem = refused(as_12).problems[0]
    assert problem.path == "$.data[0].referrer"
    assert "Person is not allowed as 'referrer' of a SessionEvent" in problem.message


def test_properties_added_in_1_2_are_refused_in_1_1():
    view = fixture("caliperEventViewViewed.json", V1P1_DIR)
    view["profile"] = "ReadingProfile"
    person = {"id": "https://example.edu/users/554433", "type": "Person",
              "otherIdentifiers": [
                  {"type": "SystemIdentifier", "identifier": "learner-554433", "identifierType": "AccountUserName"},
              ]}
    app = {"id": "https://example.edu", "type": "SoftwareApplication", "userAgent": "Mozilla/5.0"}
    for item, prop in ((view, "profile"), (person, "otherIdentifiers"), (app, "userAgent")):
        as_11, as_12 = v1p1_and_v1p2(item)
        parse_envelope(as_12)
        problem = refused(as_11).problems[0]
        assert problem.path == f"$.data[0].{prop}"
        assert problem.message.startswith(f"unknown property '{prop}'")


def test_actions_and_events_new_in_1_2_are_refused_in_core_1_1():
    printed = {"id": "urn:uuid:9d8a2f7e-3c1b-4d5a-8e6f-0a1b2c3d4e5f", "type": "Event",
               "actor": "https://example.edu/users/1", "action": "Printed", "object": "https://example.edu/docs/1",
               "eventTime": "2019-01-01T00:00:00.000Z"}
    as_11, as_12 = v1p1_and_v1p2(printed)
    parse_envelope(as_12)
    assert refused(as_11).problems[0].path == "$.data[0].action"

    launch = fixture("caliperEventToolLaunchExtension.json", V1P1_DIR)
    parse_envelope(body(envelope(launch, version=CALIPER_V1P1)))  # its own extension context
    core = as_version(launch, CALIPER_V1P1)
    problem = refused(envelope(core, version=CALIPER_V1P1)).problems[0]
    assert problem.path == "$.data[0].type"
    assert "ToolLaunchProfile-extension" in problem.message
    parse_envelope(body(envelope(as_version(launch, None), version=TOOL_LAUNCH_EXT)))  # extension as dataVersion


def test_item_context_chooses_the_model_set():
    outcome = fixture("caliperEventOutcomeGraded.json", V1P1_DIR)  # @context v1p1
    parse_envelope(body(envelope(outcome, version=CALIPER_V1P2)))
    refused(envelope(as_version(outcome, None), version=CALIPER_V1P2))  # inherits 1.2: unknown type
    parse_envelope(body(envelope(as_version(outcome, None), version=CALIPER_V1P1)))  # inherits 1.1


# --- @context -----------------------------------------------------------------


def test_context_forms():
    doc = fixture("caliperEventViewViewedDocument.json")
    inline = {"ex": "https://example.edu/vocab#"}
    accepted = [
        CALIPER_V1P2,
        "https://purl.imsglobal.org/ctx/caliper/v1p2",
        CALIPER_V1P2 + "/",
        [CALIPER_V1P2],
        ["https://schema.org/docs/jsonldcontext.json", CALIPER_V1P2],
        [inline, CALIPER_V1P2],
        inline,
    ]
    for context in accepted:
        doc["@context"] = context
        parse_envelope(body(envelope(doc)))
    del doc["@context"]
    parse_envelope(body(envelope(doc)))
    refusals = {
        "http://example.org/not/caliper": "unknown @context",
        "http://purl.imsglobal.org/ctx/caliper/v1p3": "not a Caliper context this endpoint supports",
        json.dumps([CALIPER_V1P2, inline]): "must be listed last",
        json.dumps([CALIPER_V1P1, CALIPER_V1P2]): "mixes Caliper 1.1 and 1.2",
        json.dumps([]): "empty array",
        json.dumps(["https://schema.org/"]): "does not reference the Caliper context",
        "5": "must be a string, an array or an object",
    }
    for raw, expected in refusals.items():
        try:
            doc["@context"] = json.loads(raw)
        except json.JSONDecodeError:
            doc["@context"] = raw
        problem = refused(envelope(doc)).problems[0]
        assert problem.path == '$.data[0]["@context"]' and expected in problem.message, (raw, problem)


def test_nested_entities_may_carry_local_contexts():
    doc = fixture("caliperEventViewViewedDocument.json")
    doc["object"]["@context"] = {"ex": "https://example.edu/vocab#"}
    doc["actor"]["@context"] = ["https://example.edu/ctx", {"ex": "https://example.edu/vocab#"}]
    parse_envelope(body(envelope(doc)))


SCHEMA_ORG = "https://schema.org/docs/jsonldcontext.json"


def test_an_added_remote_context_accounts_for_terms_caliper_does_not_define():
    # Caliper 1.1 section 4.1, "Referencing multiple contexts": schema.org listed before the Caliper context
    doc = fixture("caliperEventContextInlineCombined.json", V1P1_DIR)
    doc["@context"] = [SCHEMA_ORG, CALIPER_V1P1]
    doc["query"] = doc.pop("extensions")["query"]  # a schema.org property on the event itself
    doc["object"] = {"id": "https://example.edu/books/9780", "type": "Book", "isbn": "9780"}  # a schema.org type
    item = parse_envelope(body(envelope(doc, version=CALIPER_V1P1))).items[0]
    assert item.doc["query"] == "Event OR Entity" and item.doc["object"]["type"] == "Book"
    # under the Caliper context alone, the same terms are unknown
    doc["@context"] = CALIPER_V1P1
    problems = refused(envelope(doc, version=CALIPER_V1P1)).problems
    assert [p.path for p in problems] == ["$.data[0].object", "$.data[0].query"], problems


def test_an_inline_context_accounts_only_for_its_own_terms_and_only_where_it_is_defined():
    doc = fixture("caliperEventContextInlineCombined.json", V1P1_DIR)  # the spec's own example, as published
    parse_envelope(body(envelope(doc, version=CALIPER_V1P1)))
    doc["query"] = "Event OR Entity"  # the term the inline context defines, now on the event itself
    parse_envelope(body(envelope(doc, version=CALIPER_V1P1)))
    doc["page"] = 2  # a term no context defines
    problem = refused(envelope(doc, version=CALIPER_V1P1)).problems
    assert [(p.path, "unknown property 'page'" in p.message) for p in problem] == [("$.data[0].page", True)]
    del doc["page"]
    # a context on the object covers the object, not the event around it
    del doc["query"]
    doc["@context"] = CALIPER_V1P1
    doc["object"]["@context"] = {"isbn": "http://schema.org/isbn"}
    doc["object"]["isbn"] = "9780"
    parse_envelope(body(envelope(doc, version=CALIPER_V1P1)))
    doc["isbn"] = "9780"
    assert [p.path for p in refused(envelope(doc, version=CALIPER_V1P1)).problems] == ["$.data[0].isbn"]


def test_an_entity_may_bring_its_own_1_1_profile_extension_context():
    survey = {
        "@context": f"{CALIPER_V1P1}/SurveyProfile-extension",
        "id": "https://example.edu/surveys/100",
        "type": "Survey",
        "name": "Course feedback",
    }
    doc = fixture("caliperEventContextInlineCombined.json", V1P1_DIR)  # a generic Event: any entity as object
    doc["@context"] = CALIPER_V1P1
    doc["object"] = dict(survey)
    parse_envelope(body(envelope(doc, version=CALIPER_V1P1)))
    doc["object"]["mood"] = "sunny"  # the extension defines no such term: still refused
    assert refused(envelope(doc, version=CALIPER_V1P1)).problems[0].path == "$.data[0].object.mood"
    doc["object"] = {key: value for key, value in survey.items() if key != "@context"}
    message = refused(envelope(doc, version=CALIPER_V1P1)).problems[0].message
    assert "SurveyProfile-extension" in message or "not a Caliper entity type" in message


def test_a_1_1_profile_extension_that_lap_does_not_list_is_read_as_1_1_with_its_terms_unknown():
    doc = fixture("caliperEventViewViewed.json", V1P1_DIR)
    doc["@context"] = f"{CALIPER_V1P1}/QuestionnaireProfile-extension"
    doc["questionnaire"] = "https://example.edu/questionnaires/1"
    item = parse_envelope(body(envelope(doc, version=CALIPER_V1P1))).items[0]
    assert item.action == "Viewed"
    doc["action"] = "Unheardof"  # Caliper's own terms keep Caliper's rules
    assert refused(envelope(doc, version=CALIPER_V1P1)).problems[0].path == "$.data[0].action"
    doc["action"] = "Viewed"
    doc["@context"] = f"{CALIPER_V1P2}/QuestionnaireProfile-extension"  # 1.2 has no such extensions
    assert "not a Caliper context" in refused(envelope(doc, version=CALIPER_V1P1)).problems[0].message


# --- envelope level ---------------------------------------------------------------


def minimal_event(**override) -> dict:
    event = {
        "@context": CALIPER_V1P2,
        "id": "urn:uuid:0ae3a6c3-0fb2-4bd0-8a86-4b2bb0e9a9b1",
        "type": "NavigationEvent",
        "profile": "ReadingProfile",
        "actor": "https://example.edu/users/554433",
        "action": "NavigatedTo",
        "object": {"id": "https://example.edu/pages/2", "type": "WebPage"},
        "eventTime": "2024-05-01T10:15:00.000Z",
    }
    event.update(override)
    return event


@pytest.mark.parametrize(
    "raw, path, words",
    [
        (b"", "$", "empty"),
        (b"not json at all", "$", "not valid JSON"),
        (b"[1, 2]", "$", "must be a JSON object"),
        (b'"envelope"', "$", "must be a JSON object"),
        (body(envelope(minimal_event(), sensor=None) | {"sensor": 5}), "$.sensor", "must be a string"),
        (body({k: v for k, v in envelope(minimal_event()).items() if k != "sensor"}), "$.sensor", "is missing"),
        (body(envelope(minimal_event(), extra=1)), "$.extra", "unknown envelope property"),
        (body(envelope()), "$.data", "at least one"),
        (body(envelope() | {"data": {"a": 1}}), "$.data", "must be an array"),
        (body(envelope(minimal_event(), sendTime="2024-05-01T10:15:00")), "$.sendTime", "timezone"),
        (body(envelope(minimal_event(), sendTime="2024-02-30T10:15:00Z")), "$.sendTime", "timezone"),
        (body(envelope(minimal_event(), dataVersion=2)), "$.dataVersion", "must be a string"),
    ],
)
def test_envelope_level_problems_are_400(raw: bytes, path: str, words: str):
    error = refused(raw)
    assert error.status == 400
    matching = [p for p in error.problems if p.index is None and p.path.startswith(path) and words in p.message]
    assert matching, error.problems


def test_a_syntax_error_is_located_in_its_item():
    raw = wrap_raw(b'{"id": "https://example.edu/p/1", "type": "Person",}')
    error = refused(raw)
    assert error.status == 400 and error.title == "Malformed JSON"
    assert error.problems[0].index == 0 and error.problems[0].path.startswith("$.data[0]")
    assert "not valid JSON at line 1 column" in error.problems[0].message


def test_unsupported_data_version_is_422_even_with_other_problems():
    error = refused(envelope(minimal_event(), dataVersion="http://purl.imsglobal.org/ctx/caliper/v1p0"))
    assert error.status == 422 and error.problems[0].path == "$.dataVersion"
    assert "not supported" in error.problems[0].message
    worse = {k: v for k, v in envelope({"junk": True}, dataVersion="1.2").items() if k != "sensor"}
    error = refused(worse)
    assert error.status == 422
    assert [p.path for p in error.problems] == ["$.dataVersion", "$.sensor"]


def test_supported_versions():
    assert SUPPORTED_VERSIONS[0] == CALIPER_V1P1 and SUPPORTED_VERSIONS[-1] == CALIPER_V1P2
    assert TOOL_LAUNCH_EXT in SUPPORTED_VERSIONS
    event = as_version(minimal_event(), None)
    del event["profile"]  # Caliper 1.2 only
    for version in SUPPORTED_VERSIONS:
        assert parse_envelope(body(envelope(event, version=version))).data_version == version


# --- item level ------------------------------------------------------------------


def test_every_invalid_item_is_reported_and_the_envelope_refused():
    good = minimal_event()
    bad_action = minimal_event(action="Graded")
    bad_two = minimal_event(actor={"id": "https://example.edu/users/1", "type": "Person", "nickname": "x"},
                            eventTime="yesterday")
    error = refused(envelope(bad_action, good, bad_two, "not an object"))
    assert error.status == 400
    got = [(p.index, p.path) for p in error.problems]
    assert got == [
        (0, "$.data[0].action"), (2, "$.data[2].actor.nickname"), (2, "$.data[2].eventTime"), (3, "$.data[3]"),
    ]
    assert error.problems[0].message == "action 'Graded' is not allowed for NavigationEvent; allowed: NavigatedTo"
    assert error.problems[1].message.startswith("unknown property 'nickname' on a Person")


def test_problems_are_capped():
    error = refused(envelope(*[minimal_event(action="Graded")] * 150))
    assert len(error.problems) == 100 and error.truncated
    assert {p.index for p in error.problems} == set(range(100))


def test_unknown_properties_are_refused_but_extensions_are_free():
    parse_envelope(body(envelope(minimal_event(extensions={"anything": [1, {"deep": None}], "n": 1.5}))))
    not_an_object = minimal_event(extensions=["not", "an", "object"])
    assert refused(envelope(not_an_object)).problems[0].path == "$.data[0].extensions"
    assert refused(envelope(minimal_event(color="red"))).problems[0].path == "$.data[0].color"


def test_entity_needs_id_and_type_when_an_object():
    error = refused(envelope(minimal_event(object={"type": "WebPage"})))
    assert error.problems[0].path == "$.data[0].object.id"
    error = refused(envelope(minimal_event(object={"id": "https://example.edu/pages/2"})))
    assert "must have a 'type'" in error.problems[0].message


@pytest.mark.parametrize(
    "value",
    ["2024-05-01T10:15:00.000Z", "2024-05-01T10:15:00Z", "2024-05-01T10:15:00.123456Z", "2024-05-01T12:15:00+02:00",
     "2024-05-01T12:15:00.5+0200", "2024-02-29T10:15:00.000Z"],
)
def test_accepted_date_times(value: str):
    item = parse_envelope(body(envelope(minimal_event(eventTime=value)))).items[0]
    assert item.event_time.tzinfo is timezone.utc
    if not value.startswith("2024-02-29"):
        assert item.event_time.replace(microsecond=0) == datetime(2024, 5, 1, 10, 15, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "value",
    ["2024-05-01", "2024-05-01T10:15:00", "2024-05-01T10:15Z", "2024-05-01 10:15:00Z", "2024-13-01T10:15:00Z",
     "2024-04-31T10:15:00Z", "2023-02-29T10:15:00Z", "1714558500", "", "2024-05-01T25:00:00Z"],
)
def test_refused_date_times(value: str):
    problem = refused(envelope(minimal_event(eventTime=value))).problems[0]
    assert problem.path == "$.data[0].eventTime"


@pytest.mark.parametrize("value", ["PT1H2M3.5S", "P1D", "P2W", "PT3600S", "P1Y2M3DT4H5M6S", "PT0S", "P0,5D"])
def test_accepted_durations(value: str):
    parse_envelope(body(envelope({"id": "https://example.edu/s/1", "type": "Session", "duration": value})))


@pytest.mark.parametrize("value", ["P", "PT", "1H", "P1H", "PT1D", "P1DT", "2016-09-15T10:00:00.000Z", "PT-1S", "P1.5"])
def test_refused_durations(value: str):
    problem = refused(envelope({"id": "https://example.edu/s/1", "type": "Session", "duration": value})).problems[0]
    assert problem.path == "$.data[0].duration" and "ISO 8601 duration" in problem.message


def test_decimals_must_be_written_with_a_fraction():
    score = {"id": "https://example.edu/scores/1", "type": "Score", "maxScore": 15.0, "scoreGiven": 1e1}
    parse_envelope(body(envelope(score)))
    problem = refused(envelope(score | {"maxScore": 15})).problems[0]
    assert problem.path == "$.data[0].maxScore" and "15.0" in problem.message


def test_action_specific_rules():
    timed_out = minimal_event(type="SessionEvent", profile="SessionProfile", action="TimedOut",
                              actor={"id": "https://example.edu/users/1", "type": "Person"},
                              object={"id": "https://example.edu/sessions/1", "type": "Session"})
    message = refused(envelope(timed_out)).problems[0].message
    assert message.startswith("for action TimedOut the actor must be a SoftwareApplication")
    copied = minimal_event(type="ResourceManagementEvent", profile="ResourceManagementProfile", action="Copied",
                           object={"id": "https://example.edu/docs/1", "type": "Document"})
    assert refused(envelope(copied)).problems[0].path == "$.data[0].generated"
    wrong_profile = minimal_event(profile="ForumProfile", type="SearchEvent", action="Searched")
    assert refused(envelope(wrong_profile)).problems[0].path == "$.data[0].profile"
    parse_envelope(body(envelope(minimal_event(profile="GeneralProfile"))))


# --- robustness ---------------------------------------------------------------------


def test_deep_nesting_and_huge_numbers_only_raise_caliper_errors():
    cases = [
        b"[" * 100_000,
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        body(envelope(minimal_event(extensions={"big": 10**40, "small": -(10**40), "exp": 1.5e300}))),
        b'{"sensor": 1e400}',
        b"\xff\xfe\x00garbage",
        b'{"data": [' + b'{"isPartOf": ' * 900 + b"1" + b"}" * 900 + b"]}",
    ]
    chain = '{"id": "https://x/0", "type": "DigitalResource"'
    chain += "".join(f', "isPartOf": {{"id": "https://x/{i}", "type": "DigitalResource"' for i in range(1, 600))
    chain += "}" * 600
    cases.append(wrap_raw(chain.encode()))
    for raw in cases:
        try:
            parse_envelope(raw)
        except CaliperError as error:
            assert error.status == 400 and error.problems
    parse_envelope(body(envelope(minimal_event(extensions={"big": 10**40}))))


_settings = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_caliper_errors(raw: bytes):
    try:
        parse_envelope(raw)
    except CaliperError as error:
        assert error.status in (400, 422) and error.problems


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _mutation_targets(doc, path=()):
    yield path
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _mutation_targets(value, path + (key,))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _mutation_targets(value, path + (index,))


@_settings
@given(data=st.data())
def test_mutated_envelopes_only_raise_caliper_errors(data):
    base = envelope(minimal_event(),
                    {"id": "https://example.edu/scores/1", "type": "Score", "maxScore": 15.0,
                     "scoredBy": {"id": "https://example.edu/app", "type": "SoftwareApplication"}})
    doc = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 4))):
        targets = list(_mutation_targets(doc))
        path = data.draw(st.sampled_from(targets))
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            doc = data.draw(json_values)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if action == "replace":
            parent[key] = data.draw(json_values)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=12))] = data.draw(json_values)
        else:
            parent.insert(key, data.draw(json_values))
    try:
        result = parse_envelope(body(doc))
    except CaliperError as error:
        assert error.status in (400, 422) and error.problems
        assert all(p.path.startswith("$") for p in error.problems)
    else:
        assert len(result.items) == len(doc["data"])
