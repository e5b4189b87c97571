"""IMS Caliper validation for the ingest endpoint: Caliper 1.1 and 1.2 envelopes.

``parse_envelope(body)`` validates the raw request bytes and returns an
:class:`Envelope` whose :class:`Item`\\ s carry what the stream needs (kind, id,
type, action, learner, course, event time, and the item exactly as sent), or
raises :class:`CaliperError` with every :class:`ItemProblem` found.

Decisions
---------

Versions and model sets
    ``dataVersion`` selects the model set: Caliper 1.2 (``.../ctx/caliper/v1p2``),
    Caliper 1.1 (``.../ctx/caliper/v1p1``), or 1.1 plus one of its extension
    contexts (``.../ctx/caliper/v1p1/<Profile>-extension``, e.g. the
    ToolLaunchProfile extension).  Caliper 1.1 is its own model set, not 1.2 with
    leniency (see :mod:`lap.caliper.registry` for the differences).  An item whose
    own ``@context`` names a Caliper context is read with that context's model
    set; an item without ``@context``, or with only an inline context object,
    inherits the envelope's.  ``https`` and a trailing slash are accepted in
    these IRIs.

    The 1.1 text this was built from carries a few Caliper 1.2 additions
    (Event ``profile``, ``otherIdentifiers``/SystemIdentifier, Collection); they
    are treated as 1.2-only, as in the published 1.1 JSON-LD context.

@context
    A string must be a supported Caliper context; an array may add other remote
    or inline contexts but must end with the Caliper context; an unknown context
    is refused (400).  Nested entities may carry local contexts of any form.
    The terms an added context introduces are accepted where it applies (see
    :mod:`lap.caliper.contexts`); a 1.1 profile extension LAP does not list is
    read as 1.1 with terms LAP cannot know.

Rules beyond types
    Each event type allows its own actions, per version.  A 1.2 ``profile``
    must cover the event type (GeneralProfile is accepted with any type, as the
    1.2 fixtures do).  SessionEvent actor/object types follow the action,
    FeedbackEvent Ranked/Commented generate a Rating/Comment, ResourceManagement
    Copied needs ``generated``, ToolLaunch Launched needs ``federatedSession``.

Date-times
    Caliper requires ``YYYY-MM-DDTHH:mm:ss.SSSZ`` (UTC).  Accepted: any ISO 8601
    / RFC 3339 date-time with seconds and a timezone, i.e. ``Z`` or an offset
    (``+02:00``/``+0200``), with any number of fractional digits (real sensors
    send whole seconds, microseconds, offsets).  Refused: dates without a time,
    times without seconds, date-times without a timezone (their instant is
    unknown), impossible dates.  ``Item.event_time`` is converted to UTC.
    Durations must be ISO 8601 (``PT1H2M3.5S``, ``P1D``, ``P2W``).

Numbers
    Where the spec types a property ``decimal`` (scores, metric values, weights,
    scale values) a JSON integer (``15`` for ``15.0``) is refused in 1.2, as in
    its conformance fixtures, unless ``parse_envelope(..., whole_numbers=True)``;
    1.1 accepts it, as its JavaScript sensors write it.  Integers must be JSON
    integers.  Strings never stand
    in for numbers, nor numbers for strings.

Status codes
    Not JSON, not an object, envelope properties missing, wrong or unknown, or
    ``data`` empty: 400.  A ``dataVersion`` that is a string but not a supported
    version: 422, and it takes precedence over other problems because the item
    models depend on it (the other envelope-level problems are listed too).  Any
    invalid item: 400 listing the problems of every invalid item (at most 100).
    The envelope is all-or-nothing.

Describes
    Entities in ``data`` are describes (``kind="entity"``).  Structures without
    an ``id`` (TextPositionSelector, SystemIdentifier) are accepted as describes
    with ``id=""``.

Learner
    ``Item.learner`` is the actor's id; for GradeEvent (and 1.1's OutcomeEvent)
    it is the graded Attempt's ``assignee`` when the object is an Attempt object
    with an assignee, else the actor.

Limits
    The body is parsed with orjson: integers beyond 64 bits come out as floats
    (also in ``Item.doc``), a repeated key keeps its last value, and nesting is
    limited to 1024 levels (entities to about 250).
"""

from .errors import ItemProblem
from .parser import SUPPORTED_VERSIONS, CaliperError, Envelope, Item, iri_of, parse_envelope
from .vocab import CALIPER_V1P1, CALIPER_V1P2

__all__ = [
    "CALIPER_V1P1",
    "CALIPER_V1P2",
    "SUPPORTED_VERSIONS",
    "iri_of",
    "CaliperError",
    "Envelope",
    "Item",
    "ItemProblem",
    "parse_envelope",
]
