"""The Caliper type system as data: entity and event types of one model set.

A *model set* is Caliper 1.2, or Caliper 1.1 plus zero or more 1.1 extension
contexts (``http://purl.imsglobal.org/ctx/caliper/v1p1/<Profile>-extension``).
:func:`build_registry` returns, for one model set, every entity type with its
supertypes and properties, and every event type with its allowed actions and
the entity types its properties accept.  Properties are described with small
tuples (see the ``P_*`` constants and :func:`ref`/:func:`refs`/:func:`enum`).

Differences between 1.1 and 1.2 encoded here (each is the spec's own change):

* 1.1 only: ``OutcomeEvent``, ``ReadingEvent`` (deprecated, still valid in 1.1),
  the ``Epub*`` and ``Reading`` entities, and the deprecated actions of
  AnnotationEvent, AssessmentItemEvent, AssignableEvent and MediaEvent
  (e.g. MediaEvent ``Rewound``, AnnotationEvent ``Liked``).
* 1.2 only (1.1 gets some of them through an extension context): Feedback,
  ResourceManagement, Search, Survey/Questionnaire and ToolLaunch events and
  their entities, ``AggregateMeasure``, ``Collection``, ``SystemIdentifier``,
  the Event ``profile`` property, Entity ``otherIdentifiers``, DigitalResource
  ``storageName``, SoftwareApplication ``host``/``ipAddress``/``userAgent``,
  Session ``client``, ToolUseEvent ``generated`` limited to
  AggregateMeasureCollection, and the actions Accepted, Archived, Copied, ...
* ``referrer`` is any Entity in 1.1; 1.2 narrows it for NavigationEvent and
  SessionEvent (DigitalResource or SoftwareApplication) and AssessmentItemEvent
  (AssessmentItem).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import vocab as V

# --- property specs ----------------------------------------------------------

P_STR = ("str",)
P_IRI = ("iri",)
P_DATETIME = ("datetime",)
P_DURATION = ("duration",)
P_INT = ("int",)
P_NNINT = ("nnint",)
P_DECIMAL = ("decimal",)
P_BOOL = ("bool",)
P_OBJECT = ("object",)
P_STRINGS = ("strings",)
P_SELECTOR = ("selector",)
P_SYSIDS = ("sysids",)
P_CONTEXT = ("context",)
P_EVENT_ID = ("event_id",)


def ref(*types: str) -> tuple:
    """An entity given as an IRI string or as an object of one of ``types`` (or a subtype)."""
    return ("ref", tuple(types))


def refs(*types: str) -> tuple:
    """An array whose items are :func:`ref` values."""
    return ("refs", tuple(types))


def enum(name: str, values: frozenset[str]) -> tuple:
    return ("enum", name, tuple(sorted(values)))


def enums(name: str, values: frozenset[str]) -> tuple:
    return ("enums", name, tuple(sorted(values)))


@dataclass(frozen=True)
class EntityType:
    name: str
    parents: tuple[str, ...]
    own: dict[str, tuple]
    required: frozenset[str] = frozenset()
    props: dict[str, tuple] = field(default_factory=dict)  # own + inherited, filled by the builder


@dataclass(frozen=True)
class EventType:
    name: str
    actions: frozenset[str]
    props: dict[str, tuple]  # every property of the event, base ones included
    required: frozenset[str]


@dataclass(frozen=True)
class Registry:
    key: str  # e.g. "v1p2" or "v1p1+SearchProfile-extension"
    version: str  # CALIPER_V1P1 or CALIPER_V1P2
    extensions: frozenset[str]
    entities: dict[str, EntityType]
    events: dict[str, EventType]
    actions: frozenset[str]
    # entity type name -> names of it and all its subtypes
    subtypes: dict[str, frozenset[str]]

    def concrete(self, bases: tuple[str, ...]) -> tuple[str, ...]:
        names: set[str] = set()
        for base in bases:
            names |= self.subtypes.get(base, frozenset())
        return tuple(sorted(names))


# --- entity tables -----------------------------------------------------------


def _entity_table(v12: bool, exts: frozenset[str]) -> dict[str, EntityType]:
    """All entity types of one model set, with their own (not inherited) properties."""
    survey = v12 or V.EXT_SURVEY in exts
    feedback = v12 or V.EXT_FEEDBACK in exts
    search = v12 or V.EXT_SEARCH in exts
    tool_launch = v12 or V.EXT_TOOL_LAUNCH in exts
    tool_use = v12 or V.EXT_TOOL_USE in exts
    scales = survey or feedback
    questions = survey or feedback

    t: dict[str, EntityType] = {}

    def add(name, parents, own=None, required=()):
        t[name] = EntityType(name, tuple(parents), dict(own or {}), frozenset(required))

    entity_own = {
        "@context": P_CONTEXT,
        "id": P_IRI,
        "type": None,  # filled by the model builder (a Literal of the type name)
        "name": P_STR,
        "description": P_STR,
        "dateCreated": P_DATETIME,
        "dateModified": P_DATETIME,
        "extensions": P_OBJECT,
    }
    if v12:
        entity_own["otherIdentifiers"] = P_SYSIDS
    add("Entity", (), entity_own, required=("id",))

    # agents
    add("Agent", ("Entity",))
    add("Person", ("Agent",))
    add("Organization", ("Agent",), {"subOrganizationOf": ref("Organization"), "members": refs("Agent")})
    add("CourseOffering", ("Organization",), {"courseNumber": P_STR, "academicSession": P_STR})
    add("CourseSection", ("CourseOffering",), {"category": P_STR})
    add("Group", ("Organization",))
    software = {"version": P_STR}
    if v12:
        software |= {"host": P_STR, "ipAddress": P_STR, "userAgent": P_STR}
    add("SoftwareApplication", ("Agent",), software)

    # digital resources
    resource = {
        "creators": refs("Agent"),
        "mediaType": P_STR,
        "keywords": P_STRINGS,
        "learningObjectives": refs("LearningObjective"),
        "isPartOf": ref("Entity"),
        "datePublished": P_DATETIME,
        "version": P_STR,
    }
    if v12:
        resource["storageName"] = P_STR
    add("DigitalResource", ("Entity",), resource)
    add(
        "AssignableDigitalResource",
        ("DigitalResource",),
        {
            "dateToActivate": P_DATETIME,
            "dateToShow": P_DATETIME,
            "dateToStartOn": P_DATETIME,
            "dateToSubmit": P_DATETIME,
            "maxAttempts": P_NNINT,
            "maxSubmits": P_NNINT,
            "maxScore": P_DECIMAL,
        },
    )
    if v12 or survey:
        add("Collection", ("Entity",), {"items": refs("Entity")})
    drc_parents = ("Collection", "DigitalResource") if "Collection" in t else ("DigitalResource",)
    add("DigitalResourceCollection", drc_parents, {"items": refs("DigitalResource")})
    add("Assessment", ("AssignableDigitalResource", "DigitalResourceCollection"), {"items": refs("AssessmentItem")})
    add("AssessmentItem", ("AssignableDigitalResource",), {"isTimeDependent": P_BOOL})
    add("Forum", ("DigitalResourceCollection",), {"items": refs("Thread")})
    add("Thread", ("DigitalResourceCollection",), {"items": refs("Message"), "isPartOf": ref("Forum")})
    add(
        "Message",
        ("DigitalResource",),
        {"replyTo": ref("Message"), "body": P_STR, "attachments": refs("DigitalResource"), "isPartOf": ref("Thread")},
    )
    for name in ("Chapter", "Document", "Page", "WebPage"):
        add(name, ("DigitalResource",))
    add("Frame", ("DigitalResource",), {"index": P_INT})
    add("MediaObject", ("DigitalResource",), {"duration": P_DURATION})
    add(
        "AudioObject",
        ("MediaObject",),
        {"volumeLevel": P_STR, "volumeMin": P_STR, "volumeMax": P_STR, "muted": P_BOOL},
    )
    add("ImageObject", ("MediaObject",))
    add("VideoObject", ("MediaObject",))
    add("MediaLocation", ("DigitalResource",), {"currentTime": P_DURATION})
    if not v12:
        # deprecated in 1.1, removed in 1.2
        for name in ("EpubChapter", "EpubPart", "EpubVolume", "Reading"):
            add(name, ("DigitalResource",))
        add("EpubSubChapter", ("DigitalResource",), {"isPartOf": ref("EpubChapter")})

    add("LearningObjective", ("Entity",))

    # annotations
    add("Annotation", ("Entity",), {"annotator": ref("Person"), "annotated": ref("DigitalResource")})
    add("BookmarkAnnotation", ("Annotation",), {"bookmarkNotes": P_STR})
    add("HighlightAnnotation", ("Annotation",), {"selection": P_SELECTOR, "selectionText": P_STR})
    add("SharedAnnotation", ("Annotation",), {"withAgents": refs("Agent")})
    add("TagAnnotation", ("Annotation",), {"tags": P_STRINGS})

    # assessment, grading
    timed = {"startedAtTime": P_DATETIME, "endedAtTime": P_DATETIME, "duration": P_DURATION}
    add(
        "Attempt",
        ("Entity",),
        {
            "assignee": ref("Person"),
            "assignable": ref("DigitalResource"),
            "isPartOf": ref("Attempt"),
            "count": P_NNINT,
            **timed,
        },
    )
    add("Response", ("Entity",), {"attempt": ref("Attempt"), **timed})
    add("FillinBlankResponse", ("Response",), {"values": P_STRINGS})
    add("MultipleChoiceResponse", ("Response",), {"value": P_STR})
    add("MultipleResponseResponse", ("Response",), {"values": P_STRINGS})
    add("SelectTextResponse", ("Response",), {"values": P_STRINGS})
    add("TrueFalseResponse", ("Response",), {"value": P_STR})
    graded = {"attempt": ref("Attempt"), "scoredBy": ref("Agent"), "comment": P_STR}
    add("Result", ("Entity",), {**graded, "maxResultScore": P_DECIMAL, "resultScore": P_DECIMAL})
    add("Score", ("Entity",), {**graded, "maxScore": P_DECIMAL, "scoreGiven": P_DECIMAL})

    # groups, sessions
    add(
        "Membership",
        ("Entity",),
        {
            "organization": ref("Organization"),
            "member": ref("Person"),
            "roles": enums("role", V.ROLES),
            "status": enum("status", V.STATUSES),
        },
    )
    session = {"user": ref("Person"), **timed}
    if v12:
        session["client"] = ref("SoftwareApplication")
    add("Session", ("Entity",), session)
    add("LtiSession", ("Session",), {"messageParameters": P_OBJECT})

    # structures that are not entities and have no id (also accepted as describes)
    add(
        "TextPositionSelector",
        (),
        {"@context": P_CONTEXT, "type": None, "start": P_NNINT, "end": P_NNINT},
        required=("start", "end"),
    )
    if v12:
        add(
            "SystemIdentifier",
            (),
            {
                "@context": P_CONTEXT,
                "type": None,
                "identifier": P_STR,
                "identifierType": enum("system identifier type", V.SYSTEM_IDENTIFIER_TYPES),
                "source": ref("SoftwareApplication"),
                "extensions": P_OBJECT,
            },
            required=("identifier", "identifierType"),
            )

    # 1.2 profiles (1.1: through extension contexts)
    if tool_use:
        add(
            "AggregateMeasure",
            ("Entity",),
            {
                "metricValue": P_DECIMAL,
                "maxMetricValue": P_DECIMAL,
                "metric": enum("metric", V.METRICS),
                "startedAtTime": P_DATETIME,
                "endedAtTime": P_DATETIME,
            },
            required=("metric", "metricValue"),
        )
        coll = ("Collection",) if "Collection" in t else ("Entity",)
        add("AggregateMeasureCollection", coll, {"items": refs("AggregateMeasure")})
    if tool_launch:
        add("Link", ("Entity",))
        add("LtiLink", ("DigitalResource",), {"messageType": enum("LTI message type", V.LTI_MESSAGE_TYPES)})
    if search:
        add("Query", ("Entity",), {"creator": ref("Person"), "searchTarget": ref("Entity"), "searchTerms": P_STR})
        search_response = {
            "searchProvider": ref("SoftwareApplication"),
            "searchTarget": ref("Entity"),
            "query": ref("Query"),
            "searchResultsItemCount": P_NNINT,
        }
        if v12:
            search_response["searchResults"] = refs("Entity")
        add("SearchResponse", ("Entity",), search_response)
    if feedback:
        add("Comment", ("Entity",), {"commenter": ref("Person"), "commentedOn": ref("Entity"), "value": P_STR})
        add(
            "Rating",
            ("Entity",),
            {
                "rater": ref("Person"),
                "rated": ref("Entity"),
                "question": ref("Question"),
                "selections": P_STRINGS,
                "ratingComment": ref("Comment"),
            },
        )
    if scales:
        add("Scale", ("Entity",))
        labelled = {"scalePoints": P_INT, "itemLabels": P_STRINGS, "itemValues": P_STRINGS}
        add("LikertScale", ("Scale",), labelled)
        add(
            "MultiselectScale",
            ("Scale",),
            {**labelled, "isOrderedSelection": P_BOOL, "minSelections": P_INT, "maxSelections": P_INT},
        )
        add(
            "NumericScale",
            ("Scale",),
            {"minValue": P_DECIMAL, "minLabel": P_STR, "maxValue": P_DECIMAL, "maxLabel": P_STR, "step": P_DECIMAL},
        )
    if questions:
        add("Question", ("DigitalResource",), {"questionPosed": P_STR})
        add("RatingScaleQuestion", ("Question",), {"scale": ref("Scale")})
    if survey:
        add(
            "DateTimeQuestion",
            ("Question",),
            {"minDateTime": P_DATETIME, "minLabel": P_STR, "maxDateTime": P_DATETIME, "maxLabel": P_STR},
        )
        add(
            "MultiselectQuestion",
            ("Question",),
            {"points": P_INT, "itemLabels": P_STRINGS, "itemValues": P_STRINGS},
        )
        add("OpenEndedQuestion", ("Question",))
        add("Questionnaire", ("DigitalResourceCollection",), {"items": refs("QuestionnaireItem")}, required=("items",))
        add(
            "QuestionnaireItem",
            ("DigitalResource",),
            {"question": ref("Question"), "categories": P_STRINGS, "weight": P_DECIMAL},
        )
        add("Survey", ("Collection",), {"items": refs("Questionnaire")})
        add(
            "SurveyInvitation",
            ("DigitalResource",),
            {
                "rater": ref("Person"),
                "survey": ref("Survey"),
                "sentCount": P_INT,
                "dateSent": P_DATETIME,
                # the spec's prose calls it sentDate, its context and fixtures dateSent
                "sentDate": P_DATETIME,
            },
        )
        add("DateTimeResponse", ("Response",), {"dateTimeSelected": P_DATETIME})
        add("MultiselectResponse", ("Response",), {"selections": P_STRINGS})
        add("OpenEndedResponse", ("Response",), {"value": P_STR})
        add("RatingScaleResponse", ("Response",), {"selections": P_STRINGS})
    return t


# --- event tables ------------------------------------------------------------

_ANY = ("Entity",)


def _event_table(v12: bool, exts: frozenset[str], all_actions: frozenset[str]) -> dict[str, EventType]:
    base = {
        "@context": P_CONTEXT,
        "id": P_EVENT_ID,
        "type": None,
        "actor": ref("Agent"),
        "action": None,  # a Literal of the allowed actions, filled by the model builder
        "object": ref(*_ANY),
        "eventTime": P_DATETIME,
        "target": ref(*_ANY),
        "generated": ref(*_ANY),
        "edApp": ref("SoftwareApplication"),
        "referrer": ref(*_ANY),
        "group": ref("Organization"),
        "membership": ref("Membership"),
        "session": ref("Session"),
        "federatedSession": ref("LtiSession"),
        "extensions": P_OBJECT,
    }
    if v12:
        base["profile"] = enum("profile", frozenset(V.PROFILE_EVENTS))
    required = frozenset({"id", "type", "actor", "action", "object", "eventTime"})
    t: dict[str, EventType] = {}
    person = ref("Person")
    resource_or_app = ref("DigitalResource", "SoftwareApplication")

    def add(name, actions, **over):
        acts = frozenset(actions) & all_actions
        if name == "MediaEvent" or name == "Event":
            acts |= V.CAPTIONING_ALIASES
        t[name] = EventType(name, acts, {**base, **over}, required)

    add("Event", all_actions)
    annotation_actions = {"Bookmarked", "Highlighted", "Shared", "Tagged"}
    assessment_item_actions = {"Started", "Skipped", "Completed"}
    assignable_actions = {"Activated", "Deactivated", "Started", "Completed", "Submitted", "Reviewed"}
    media_actions = set(V.MEDIA_ACTIONS)
    if not v12:  # deprecated in 1.1, removed in 1.2
        annotation_actions |= {
            "Attached", "Classified", "Commented", "Described", "Disliked", "Identified",
            "Liked", "Linked", "Questioned", "Ranked", "Recommended", "Subscribed",
        }
        assessment_item_actions |= {"Reviewed", "Viewed"}
        assignable_actions |= {"Abandoned", "Hid", "Showed"}
        media_actions |= {"Rewound"}

    add(
        "AnnotationEvent", annotation_actions, actor=person, object=ref("DigitalResource"),
        target=ref("Frame"), generated=ref("Annotation"),
    )
    add(
        "AssessmentEvent", {"Started", "Paused", "Resumed", "Restarted", "Reset", "Submitted"},
        actor=person, object=ref("Assessment"), generated=ref("Attempt"),
    )
    add(
        "AssessmentItemEvent", assessment_item_actions, actor=person, object=ref("AssessmentItem"),
        generated=ref("Attempt", "Response"),
        **({"referrer": ref("AssessmentItem")} if v12 else {}),
    )
    add(
        "AssignableEvent", assignable_actions, actor=person, object=ref("AssignableDigitalResource"),
        target=ref("Frame"), generated=ref("Attempt"),
    )
    add("ForumEvent", {"Subscribed", "Unsubscribed"}, actor=person, object=ref("Forum"))
    add("GradeEvent", {"Graded"}, actor=ref("Agent"), object=ref("Attempt"), generated=ref("Score"))
    add("MediaEvent", media_actions, actor=person, object=ref("MediaObject"), target=ref("MediaLocation"))
    add("MessageEvent", {"MarkedAsRead", "MarkedAsUnread", "Posted"}, actor=person, object=ref("Message"))
    add(
        "NavigationEvent", {"NavigatedTo"}, actor=person, object=resource_or_app,
        **({"referrer": resource_or_app} if v12 else {"target": ref("DigitalResource")}),
    )
    add(
        "SessionEvent", {"LoggedIn", "LoggedOut", "TimedOut"}, actor=ref("Person", "SoftwareApplication"),
        object=ref("Session", "SoftwareApplication"), target=ref("DigitalResource"),
        **({"referrer": resource_or_app} if v12 else {}),
    )
    add("ThreadEvent", {"MarkedAsRead", "MarkedAsUnread"}, actor=person, object=ref("Thread"))
    tool_use_generated = ref("AggregateMeasureCollection") if (v12 or V.EXT_TOOL_USE in exts) else ref(*_ANY)
    add(
        "ToolUseEvent", {"Used"}, actor=person, object=ref("SoftwareApplication"),
        target=ref("SoftwareApplication"), generated=tool_use_generated,
    )
    add("ViewEvent", {"Viewed"}, actor=person, object=ref("DigitalResource"))
    if not v12:
        add("OutcomeEvent", {"Graded"}, actor=ref("Agent"), object=ref("Attempt"), generated=ref("Result"))
        add(
            "ReadingEvent", {"NavigatedTo", "Searched", "Viewed"}, actor=person,
            object=ref("DigitalResource"), target=ref("Frame"),
        )
    if v12 or V.EXT_FEEDBACK in exts:
        add(
            "FeedbackEvent", {"Commented", "Ranked"}, actor=person, object=ref(*_ANY),
            target=ref("Frame"), generated=ref("Rating", "Comment"),
        )
    if v12 or V.EXT_RESOURCE_MANAGEMENT in exts:
        add(
            "ResourceManagementEvent", V.RESOURCE_MANAGEMENT_ACTIONS, actor=person,
            object=ref("DigitalResource"), generated=ref("DigitalResource"),
        )
    if v12 or V.EXT_SEARCH in exts:
        add("SearchEvent", {"Searched"}, actor=person, object=ref(*_ANY), generated=ref("SearchResponse"))
    if v12 or V.EXT_SURVEY in exts:
        add("QuestionnaireEvent", {"Started", "Submitted"}, actor=person, object=ref("Questionnaire"))
        add(
            "QuestionnaireItemEvent", {"Started", "Skipped", "Completed"}, actor=person,
            object=ref("QuestionnaireItem"), generated=ref("Response"),
        )
        add("SurveyEvent", {"OptedIn", "OptedOut"}, actor=person, object=ref("Survey"))
        add(
            "SurveyInvitationEvent", {"Accepted", "Declined", "Sent"}, actor=person,
            object=ref("SurveyInvitation"),
        )
    if v12 or V.EXT_TOOL_LAUNCH in exts:
        add(
            "ToolLaunchEvent", {"Launched", "Returned"}, actor=person, object=ref("SoftwareApplication"),
            generated=ref("DigitalResource"), target=ref("Link", "LtiLink"),
        )
    return t


# --- assembly ----------------------------------------------------------------


def registry_key(version: str, extensions: frozenset[str]) -> str:
    short = "v1p2" if version == V.CALIPER_V1P2 else "v1p1"
    return "+".join([short, *sorted(extensions)])


def build_registry(version: str, extensions: frozenset[str] = frozenset()) -> Registry:
    v12 = version == V.CALIPER_V1P2
    if v12 and extensions:
        raise ValueError("extension contexts exist for Caliper 1.1 only")
    if v12:
        actions = V.ACTIONS_V1P2
    else:
        actions = V.ACTIONS_V1P1.union(*(V.EXTENSION_ACTIONS[e] for e in extensions))
    table = _entity_table(v12, extensions)

    # subtype closure and inherited properties
    children: dict[str, set[str]] = {name: set() for name in table}
    for name, et in table.items():
        for parent in et.parents:
            children[parent].add(name)
    subtypes: dict[str, frozenset[str]] = {}

    def closure(name: str) -> frozenset[str]:
        if name not in subtypes:
            found = {name}
            for child in children[name]:
                found |= closure(child)
            subtypes[name] = frozenset(found)
        return subtypes[name]

    for name in table:
        closure(name)

    resolved: dict[str, EntityType] = {}

    def resolve(name: str) -> EntityType:
        if name not in resolved:
            et = table[name]
            props: dict[str, tuple] = {}
            required: set[str] = set()
            for parent in et.parents:
                p = resolve(parent)
                props.update(p.props)
                required |= p.required
            props.update(et.own)
            required |= et.required
            resolved[name] = EntityType(name, et.parents, et.own, frozenset(required), props)
        return resolved[name]

    for name in table:
        resolve(name)
    events = _event_table(v12, extensions, actions)
    return Registry(
        key=registry_key(version, extensions),
        version=version,
        extensions=extensions,
        entities=resolved,
        events=events,
        actions=actions | V.CAPTIONING_ALIASES,
        subtypes=subtypes,
    )
