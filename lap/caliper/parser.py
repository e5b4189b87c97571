"""``parse_envelope``: raw request bytes in, validated envelope (or every problem) out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from . import contexts
from . import models as M
from . import vocab as V
from .errors import ItemProblem, article, item_problems, show
from .jsonpos import join, locate, path_of
from .registry import build_registry

MAX_PROBLEMS = 100

SUPPORTED_VERSIONS: tuple[str, ...] = (
    V.CALIPER_V1P1,
    *V.EXTENSION_IRIS,
    V.CALIPER_V1P2,
)


class CaliperError(Exception):
    """The request cannot be accepted: ``status`` 400 or 422, and every problem found."""

    def __init__(self, status: int, title: str, problems: list[ItemProblem]):
        self.status = status
        self.title = title
        self.problems = problems[:MAX_PROBLEMS]
        self.truncated = len(problems) > MAX_PROBLEMS
        first = self.problems[0].message if self.problems else ""
        super().__init__(f"{status} {title}: {first}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))


@dataclass(slots=True)
class Item:
    """One valid ``data`` entry.

    ``learner`` (events): the actor's id, or for a GradeEvent/OutcomeEvent the
    graded Attempt's ``assignee``; ``course`` (events): the ``group`` id;
    ``event_time``: ``eventTime`` in UTC; ``doc``: the item exactly as parsed.
    Entities (describes) have no action, learner, course or event time.
    """

    index: int
    kind: Literal["event", "entity"]
    id: str
    type: str
    action: str | None
    learner: str | None
    course: str | None
    event_time: datetime | None
    doc: dict


@dataclass(slots=True)
class Envelope:
    """A valid envelope; ``data_version`` is the canonical IRI of its ``dataVersion``."""

    sensor: str
    send_time: datetime
    data_version: str
    items: list[Item]


class EnvelopeModel(BaseModel):
    """The Caliper envelope (section 5.2); ``data`` items are validated by their own models."""

    model_config = ConfigDict(strict=True, extra="forbid")

    sensor: Annotated[str, StringConstraints(min_length=1)]
    sendTime: M.DateTimeStr
    dataVersion: str
    data: Annotated[list[Any], Field(min_length=1)]


_ENVELOPE_VALIDATOR = EnvelopeModel.__pydantic_validator__
_ENVELOPE_FIELDS = ("sensor", "sendTime", "dataVersion", "data")

_GRADED = frozenset({"GradeEvent", "OutcomeEvent"})
_PROFILE_EVENTS = {p: frozenset(events) for p, events in V.PROFILE_EVENTS.items()}
_MISSING = object()
# the types each 1.1 extension context adds (for hints; no models are built for this)
_EXTENSION_TYPES = {
    ext: frozenset(reg.entities) | frozenset(reg.events)
    for ext, reg in ((e, build_registry(V.CALIPER_V1P1, frozenset({e}))) for e in V.V1P1_EXTENSIONS)
}


# --- helpers -----------------------------------------------------------------


def iri_of(value: Any) -> str | None:
    """The id of an entity given as an IRI string or as an object (None for anything else)."""
    if type(value) is str:
        return value
    if type(value) is dict:
        found = value.get("id")
        return found if type(found) is str else None
    return None


def _utc(text: str) -> datetime | None:
    """Parse a date-time the models already matched against the ISO 8601 pattern."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None  # e.g. 29 February of a common year
    if moment.tzinfo is timezone.utc:
        return moment
    return moment.astimezone(timezone.utc)


# whole numbers allowed for decimals -> the core contexts in every accepted spelling -> model set (extensions take
# the slower path); the 1.2 set that allows them is built on first use
def _sets_by_context(whole_numbers: bool) -> dict[str, M.ModelSet]:
    return {spelling: M.model_set(*contexts.version_of(spelling), whole_numbers=whole_numbers)
            for spelling, iri in contexts.SPELLINGS.items() if iri in (V.CALIPER_V1P1, V.CALIPER_V1P2)}


_SETS_BY_CONTEXT: dict[bool, dict[str, M.ModelSet]] = {False: _sets_by_context(False)}


def _load(body: bytes | bytearray | str) -> Any:
    # orjson reads integers beyond 64 bits as floats and refuses documents nested
    # deeper than 1024 levels; both are far outside what a Caliper sensor sends.
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _syntax_error(body, exc) from None


def _syntax_error(body: bytes, exc: Exception) -> "CaliperError":
    text = body.decode("utf-8", errors="replace") if isinstance(body, (bytes, bytearray)) else str(body)
    pos = getattr(exc, "pos", None)
    keys: list = []
    if isinstance(pos, int) and 0 <= pos <= len(text):
        keys = locate(text, pos)
    index = keys[1] if len(keys) >= 2 and keys[0] == "data" and type(keys[1]) is int else None
    detail = getattr(exc, "msg", None) or str(exc)
    where = ""
    if isinstance(pos, int):
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        where = f" at line {line} column {column}"
    problem = ItemProblem(index, path_of(keys), f"the body is not valid JSON{where}: {detail}")
    return CaliperError(400, "Malformed JSON", [problem])


# --- envelope level ----------------------------------------------------------


def _envelope_problems(doc: dict) -> list[ItemProblem]:
    try:
        _ENVELOPE_VALIDATOR.validate_python(doc)
        return []
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
    problems: list[ItemProblem] = []
    for err in errors:
        loc = err["loc"]
        name = loc[0] if loc else None
        path = "$" if name is None else join("$", name)
        value = doc.get(name) if type(name) is str else None
        kind = err["type"]
        if kind == "missing":
            message = f"required envelope property '{name}' is missing"
        elif kind == "extra_forbidden":
            message = f"unknown envelope property '{name}'; an envelope has only {', '.join(_ENVELOPE_FIELDS)}"
        elif name == "data" and kind == "too_short":
            message = "data must contain at least one event or entity"
        elif name == "data" and kind == "list_type":
            message = f"data must be an array of events and entities; got {show(value)}"
        elif name == "sendTime" and kind == "string_pattern_mismatch":
            message = f"sendTime {show(value)} is not an ISO 8601 date-time with a timezone (YYYY-MM-DDTHH:mm:ss.SSSZ)"
        elif kind == "string_too_short":
            message = f"{name} must not be empty"
        elif kind == "string_type":
            message = f"{name} must be a string; got {show(value)}"
        else:
            message = f"{name}: {err['msg']}"
        problems.append(ItemProblem(None, path, message))
    return problems


# --- item level --------------------------------------------------------------


_SPECIAL_EVENTS = frozenset({"SessionEvent", "FeedbackEvent", "ResourceManagementEvent", "ToolLaunchEvent"})


def _action_checks(index: int, item: dict) -> list[ItemProblem]:
    """Rules that depend on the action, for the few event types that have them."""
    problems: list[ItemProblem] = []
    base = f"$.data[{index}]"
    etype = item["type"]
    action = item["action"]
    if etype == "SessionEvent":
        actor, obj = item.get("actor"), item.get("object")
        if action == "TimedOut":
            want_actor, want_object = ("SoftwareApplication",), ("Session", "LtiSession")
        else:
            want_actor, want_object = ("Person",), ("SoftwareApplication",)
        if type(actor) is dict and actor.get("type") not in want_actor:
            got = article(str(actor.get("type")))
            message = f"for action {action} the actor must be {article(want_actor[0])}; got {got}"
            problems.append(ItemProblem(index, f"{base}.actor", message))
        if type(obj) is dict and obj.get("type") not in want_object:
            got = article(str(obj.get("type")))
            message = f"for action {action} the object must be {article(want_object[0])}; got {got}"
            problems.append(ItemProblem(index, f"{base}.object", message))
    elif etype == "FeedbackEvent":
        generated = item.get("generated")
        want = {"Ranked": "Rating", "Commented": "Comment"}.get(action)
        if want and type(generated) is dict and generated.get("type") != want:
            got = article(str(generated.get("type")))
            message = f"for action {action} the generated entity must be {article(want)}; got {got}"
            problems.append(ItemProblem(index, f"{base}.generated", message))
    elif etype == "ResourceManagementEvent":
        if action == "Copied" and item.get("generated") is None:
            message = "required property 'generated' (the copy) is missing for action Copied"
            problems.append(ItemProblem(index, f"{base}.generated", message))
    elif etype == "ToolLaunchEvent":
        if action == "Launched" and item.get("federatedSession") is None:
            message = "required property 'federatedSession' (the platform's LtiSession) is missing for action Launched"
            problems.append(ItemProblem(index, f"{base}.federatedSession", message))
    return problems


def _finish(index: int, item: dict, is_event: bool, problems: list[ItemProblem]) -> Item | None:
    """The :class:`Item` for a valid item, after the checks a type schema cannot express."""
    if not is_event:
        found = item.get("id")
        return Item(index, "entity", found if type(found) is str else "", item["type"], None, None, None, None, item)
    etype = item["type"]
    count = len(problems)
    profile = item.get("profile")
    # GeneralProfile is accepted with any event type: the 1.2 conformance fixtures use
    # it with a NavigationEvent, although the General Profile text reserves it for Event.
    if profile is not None and profile != "GeneralProfile" and etype not in _PROFILE_EVENTS[profile]:
        allowed = ", ".join(V.PROFILE_EVENTS[profile])
        message = f"profile '{profile}' does not cover {etype}; it covers {allowed}"
        problems.append(ItemProblem(index, f"$.data[{index}].profile", message))
    if etype in _SPECIAL_EVENTS:
        problems.extend(_action_checks(index, item))
    event_time = _utc(item["eventTime"])
    if event_time is None:
        message = f"{show(item['eventTime'])} is not a valid calendar date-time"
        problems.append(ItemProblem(index, f"$.data[{index}].eventTime", message))
    if len(problems) > count:
        return None
    actor = item["actor"]
    learner = actor if type(actor) is str else actor["id"]
    if etype in _GRADED:
        attempt = item["object"]
        if type(attempt) is dict:
            assignee = iri_of(attempt.get("assignee"))
            if assignee is not None:
                learner = assignee
    group = item.get("group")
    course = None if group is None else (group if type(group) is str else group["id"])
    return Item(index, "event", item["id"], etype, item["action"], learner, course, event_time, item)


def _type_problem(model_set: M.ModelSet, index: int, item: dict) -> ItemProblem | None:
    etype = item.get("type", _MISSING)
    base = f"$.data[{index}]"
    if etype is _MISSING:
        return ItemProblem(index, base, "the item has no 'type' (an event or entity type term is required)")
    if type(etype) is not str:
        return ItemProblem(index, f"{base}.type", f"type must be a string; got {show(etype)}")
    registry = model_set.registry
    if etype in registry.events or etype in registry.entities:
        return None
    version = "1.2" if registry.version == V.CALIPER_V1P2 else "1.1"
    hints = []
    other = M.V1P1 if registry.version == V.CALIPER_V1P2 else M.V1P2
    if etype in other.kinds:
        hints.append(f"it exists in Caliper {'1.1' if version == '1.2' else '1.2'}")
    if version == "1.1":
        for ext, names in _EXTENSION_TYPES.items():
            if ext not in registry.extensions and etype in names:
                hints.append(f"in 1.1 it needs the context {V.CALIPER_V1P1}/{ext}")
                break
    hint = f" ({'; '.join(hints)})" if hints else ""
    return ItemProblem(index, f"{base}.type", f"{show(etype)} is not a Caliper {version} event or entity type{hint}")


def _with_added_contexts(model_set: M.ModelSet, index: int, item: dict,
                         whole_numbers: bool) -> list[ItemProblem] | None:
    """The problems of an item read with the contexts it adds, or None if it adds none.

    Only items the Caliper models refused come here, so the common case pays nothing.
    """
    adds, extensions = contexts.nested_contexts(item)
    registry = model_set.registry
    if extensions - registry.extensions and registry.version == V.CALIPER_V1P1:
        model_set = M.model_set(V.CALIPER_V1P1, registry.extensions | extensions, whole_numbers=whole_numbers)
    elif not adds:
        return None
    stripped = contexts.strip_added_terms(item, model_set.registry)
    try:
        model_set.item_list.validator.validate_python([stripped])
        return []
    except ValidationError as exc:
        errors = [{**err, "loc": err["loc"][1:]} for err in exc.errors(include_url=False, include_input=False)]
    return item_problems(model_set, index, stripped, errors) or [
        ItemProblem(index, f"$.data[{index}]", errors[0]["msg"])]


def _parse(body: bytes | bytearray | memoryview | str, whole_numbers: bool = False) -> Envelope:
    if isinstance(body, memoryview):
        body = body.tobytes()
    if not isinstance(body, (bytes, bytearray, str)):
        raise CaliperError(400, "Malformed JSON",
                           [ItemProblem(None, "$", "the body must be bytes holding a JSON object")])
    if not body:
        problem = ItemProblem(None, "$", "the body is empty; a Caliper envelope is required")
        raise CaliperError(400, "No envelope", [problem])
    doc = _load(body)
    if type(doc) is not dict:
        problem = ItemProblem(None, "$", f"the body must be a JSON object (a Caliper envelope); got {show(doc, 40)}")
        raise CaliperError(400, "No envelope", [problem])

    problems = _envelope_problems(doc)  # envelope level; item problems go to `found`
    data_version = doc.get("dataVersion")
    if type(data_version) is str and contexts.canonical(data_version) is None:
        supported = ", ".join(SUPPORTED_VERSIONS)
        message = f"dataVersion {show(data_version)} is not supported; supported: {supported}"
        unsupported = ItemProblem(None, "$.dataVersion", message)
        raise CaliperError(422, "Unsupported Caliper dataVersion", [unsupported, *problems])
    data = doc.get("data")
    if type(data_version) is not str or type(data) is not list:
        raise CaliperError(400, "Invalid Caliper envelope", problems)

    canonical_version = contexts.canonical(data_version)
    envelope_set = M.model_set(*contexts.version_of(canonical_version), whole_numbers=whole_numbers)
    # items grouped by the model set they are read with: id(set) -> (model set, indexes, items)
    groups: dict[int, tuple[M.ModelSet, list[int], list[dict]]] = {}
    kinds: dict[int, bool] = {}
    found: list[ItemProblem] = []
    by_context = _SETS_BY_CONTEXT.get(whole_numbers)
    if by_context is None:
        by_context = _SETS_BY_CONTEXT[whole_numbers] = _sets_by_context(whole_numbers)
    for index, item in enumerate(data):
        if type(item) is not dict:
            message = f"each data item must be an event or entity object; got {show(item, 40)}"
            found.append(ItemProblem(index, f"$.data[{index}]", message))
            continue
        context = item.get("@context", _MISSING)
        if context is _MISSING:
            model_set = envelope_set
        else:
            model_set = by_context.get(context) if type(context) is str else None
            if model_set is None:
                try:
                    named = contexts.resolve(context)
                except contexts.ContextError as exc:
                    found.append(ItemProblem(index, f'$.data[{index}]["@context"]', str(exc)))
                    continue
                model_set = envelope_set if named is None else M.model_set(*named, whole_numbers=whole_numbers)
        etype = item.get("type")
        is_event = model_set.kinds.get(etype) if type(etype) is str else None
        if is_event is None:
            found.append(_type_problem(model_set, index, item))
            continue
        kinds[index] = is_event
        group = groups.get(id(model_set))
        if group is None:
            group = groups[id(model_set)] = (model_set, [], [])
        group[1].append(index)
        group[2].append(item)

    failed: set[int] = {p.index for p in found}
    out: list[Item | None] = [None] * len(data)
    for model_set, indexes, items in groups.values():
        try:
            model_set.item_list.validator.validate_python(items)
        except ValidationError as exc:
            by_item: dict[int, list[dict]] = {}
            for err in exc.errors(include_url=False, include_input=False):
                loc = err["loc"]
                if loc and type(loc[0]) is int:
                    by_item.setdefault(loc[0], []).append({**err, "loc": loc[1:]})
            for position, errors in by_item.items():
                if len(found) > MAX_PROBLEMS:
                    break  # the answer lists at most MAX_PROBLEMS; spare the translation of the rest
                index = indexes[position]
                located = _with_added_contexts(model_set, index, items[position], whole_numbers)
                if located == []:
                    continue  # valid once the terms of its added contexts are accounted for
                if located is None:
                    located = item_problems(model_set, index, items[position], errors)
                if not located:  # every error was in a union member that does not apply; keep one anyway
                    located = [ItemProblem(index, f"$.data[{index}]", errors[0].get("msg", "invalid item"))]
                found.extend(located)
                failed.add(index)
        for position, item in enumerate(items):
            index = indexes[position]
            if index not in failed:
                out[index] = _finish(index, item, kinds[index], found)

    if problems or found:
        found.sort(key=lambda p: p.index)
        title = "Invalid Caliper envelope" if problems else "Invalid Caliper data"
        raise CaliperError(400, title, problems + found)

    send_time = _utc(doc["sendTime"])
    if send_time is None:
        message = f"{show(doc['sendTime'])} is not a valid calendar date-time"
        raise CaliperError(400, "Invalid Caliper envelope", [ItemProblem(None, "$.sendTime", message)])
    return Envelope(doc["sensor"], send_time, canonical_version, out)


def parse_envelope(body: bytes, whole_numbers: bool = False) -> Envelope:
    """Validate a Caliper envelope from the raw request body.

    Returns the envelope with one :class:`Item` per ``data`` entry, or raises
    :class:`CaliperError` (400: no or malformed envelope, invalid item; 422:
    unsupported ``dataVersion``) listing every problem found.  No other
    exception escapes, whatever the bytes.
    """
    try:
        return _parse(body, whole_numbers)
    except CaliperError:
        raise
    except RecursionError:
        raise CaliperError(400, "Malformed JSON",
                           [ItemProblem(None, "$", "the document is nested too deeply")]) from None
    except MemoryError:
        problem = ItemProblem(None, "$", "the document is too large to validate")
        raise CaliperError(400, "Malformed JSON", [problem]) from None
    except Exception as exc:  # a defect here must not become a 500 for the sensor
        problem = ItemProblem(None, "$", f"the envelope could not be validated ({type(exc).__name__})")
        raise CaliperError(400, "Invalid Caliper envelope", [problem]) from exc
