"""JSON-LD ``@context`` handling: which Caliper model set an item is written against.

Rules (Caliper 1.1 and 1.2 section "JSON-LD Context"):

* a string must be a Caliper context IRI: ``.../ctx/caliper/v1p1``,
  ``.../ctx/caliper/v1p2`` or a 1.1 extension ``.../ctx/caliper/v1p1/<Profile>-extension``
  (which imports 1.1 and adds that profile's terms); a 1.1 profile extension
  LAP does not list is read as 1.1 with an added remote context (below);
* an array may combine other remote contexts (strings) and inline contexts
  (objects) with the Caliper context, which must come last; several Caliper
  contexts may be listed if they are of one version (1.1 + extensions);
* an inline object alone (terms defined inline, as in the spec's type-coercion
  example) names no Caliper version: the item is read with the envelope's;
* no ``@context``: the item inherits the envelope's ``dataVersion``.

IRIs are compared exactly except that ``https`` is accepted for ``http`` and a
trailing slash is ignored (both appear in published Caliper material).

Added contexts (spec section 4.1: "additional remote or inline local contexts
may be referenced any time a JSON object is defined"): an item whose Caliper
context comes with others may use the terms those others introduce, on the
object that references them and inside it.  An inline context introduces its
own keys; a remote one (schema.org, or a 1.1 profile extension LAP does not
list) may introduce any term, since LAP cannot fetch it.  Under the Caliper
contexts alone an unknown term is still refused.  :func:`strip_added_terms`
removes what the added contexts account for, so that the rest is validated
against the Caliper models as usual.
"""

from __future__ import annotations

import re
from typing import Any

from . import vocab as V

# canonical context IRI -> (version, extensions)
_CANONICAL: dict[str, tuple[str, frozenset[str]]] = {
    V.CALIPER_V1P1: (V.CALIPER_V1P1, frozenset()),
    V.CALIPER_V1P2: (V.CALIPER_V1P2, frozenset()),
    **{iri: (V.CALIPER_V1P1, frozenset({name})) for iri, name in V.EXTENSION_IRIS.items()},
}
# every accepted spelling -> canonical IRI
SPELLINGS: dict[str, str] = {}
for _iri in _CANONICAL:
    for _v in (_iri, _iri + "/"):
        SPELLINGS[_v] = _iri
        SPELLINGS["https://" + _v[len("http://") :]] = _iri

# a 1.1 profile extension context that is not one of V.V1P1_EXTENSIONS: read as 1.1, its terms unknown here
_UNLISTED_EXTENSION = re.compile(r"^https?://purl\.imsglobal\.org/ctx/caliper/v1p1/[A-Za-z][A-Za-z0-9]*-extension/?$")

ANY_TERM = "*"  # the added terms of a context LAP cannot read: any term may be one of them

Added = frozenset[str] | str | None  # the terms an added context introduces: a set of names, ANY_TERM, or none


class ContextError(ValueError):
    """An unusable ``@context``; the message is meant for the sensor's developer."""


def canonical(iri: str) -> str | None:
    """The canonical Caliper context IRI for ``iri``, or None if it is not one."""
    return SPELLINGS.get(iri)


def version_of(iri: str) -> tuple[str, frozenset[str]]:
    return _CANONICAL[SPELLINGS[iri]]


def _caliperish(value: str) -> bool:
    return "purl.imsglobal.org/ctx/caliper" in value


def resolve(context: object) -> tuple[str, frozenset[str]] | None:
    """(version, extensions) named by a top-level ``@context``; None for an inline-only context.

    Raises :class:`ContextError` for anything the spec does not allow.
    """
    if type(context) is str:
        if context in SPELLINGS:
            return version_of(context)
        if _UNLISTED_EXTENSION.match(context):
            return V.CALIPER_V1P1, frozenset()
        if _caliperish(context):
            raise ContextError(f"'{_short(context)}' is not a Caliper context this endpoint supports")
        raise ContextError(f"unknown @context '{_short(context)}': the Caliper context IRI is required")
    if type(context) is dict:
        return None
    if type(context) is not list:
        raise ContextError("@context must be a string, an array or an object")
    if not context:
        raise ContextError("@context must not be an empty array")
    found: list[tuple[str, frozenset[str]]] = []
    for position, entry in enumerate(context):
        if type(entry) is str:
            if entry in SPELLINGS:
                found.append(version_of(entry))
            elif _UNLISTED_EXTENSION.match(entry):
                found.append((V.CALIPER_V1P1, frozenset()))
            elif _caliperish(entry):
                raise ContextError(f"'{_short(entry)}' is not a Caliper context this endpoint supports")
        elif type(entry) is not dict:
            raise ContextError(f"@context[{position}] must be a context IRI string or an inline context object")
    last = context[-1]
    if type(last) is not str or (last not in SPELLINGS and not _UNLISTED_EXTENSION.match(last)):
        if found:
            raise ContextError("the Caliper context must be listed last in the @context array")
        raise ContextError("the @context array does not reference the Caliper context")
    versions = {v for v, _ in found}
    if len(versions) > 1:
        raise ContextError("the @context array mixes Caliper 1.1 and 1.2 contexts")
    extensions = frozenset().union(*(e for _, e in found))
    return found[-1][0], extensions


def _short(value: str, limit: int = 120) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def added_terms(context: object) -> Added:
    """The terms a ``@context`` adds to Caliper's (see the module's docstring)."""
    entries = context if type(context) is list else (context,)
    names: set[str] = set()
    for entry in entries:
        if type(entry) is str:
            if entry not in SPELLINGS:
                return ANY_TERM  # a remote context: schema.org, a profile extension LAP does not list, ...
        elif type(entry) is dict:
            if "@vocab" in entry:
                return ANY_TERM  # every term is mapped under the vocabulary
            names.update(key for key in entry if not key.startswith("@"))
    return frozenset(names) if names else None


def _widen(scope: Added, more: Added) -> Added:
    if more is None or scope == ANY_TERM:
        return scope
    if more == ANY_TERM or scope is None:
        return more
    return scope | more


def _may_add(scope: Added, term: Any) -> bool:
    return scope == ANY_TERM or (scope is not None and term in scope)


def nested_contexts(item: dict) -> tuple[bool, frozenset[str]]:
    """Whether any object of ``item`` adds terms, and the 1.1 extensions its nested contexts name.

    An entity may carry its own Caliper extension context (a Survey under
    SurveyProfile-extension inside a plain 1.1 event): its terms are then read
    with that extension.
    """
    adds = False
    extensions: set[str] = set()
    stack: list[Any] = [item]
    while stack:
        node = stack.pop()
        if type(node) is list:
            stack.extend(node)
            continue
        if type(node) is not dict:
            continue
        context = node.get("@context")
        if context is not None:
            if added_terms(context) is not None:
                adds = True
            for entry in context if type(context) is list else (context,):
                if type(entry) is str and entry in SPELLINGS:
                    extensions |= version_of(entry)[1]
        stack.extend(value for key, value in node.items() if key not in ("extensions", "@context"))
    return adds, frozenset(extensions)


_ENTITY_VALUED = frozenset({"ref", "refs", "sysids", "selector"})


def strip_added_terms(node: Any, registry: Any, scope: Added = None, top: bool = True) -> Any:
    """``node`` without what its added contexts account for, for validation against the Caliper models.

    A property such a context introduces is dropped; an entity of a type it
    introduces stands as its id (an IRI reference is always allowed where an
    entity is).  Everything else is kept, so Caliper's own rules still apply.
    """
    if type(node) is list:
        return [strip_added_terms(value, registry, scope, False) for value in node]
    if type(node) is not dict:
        return node
    context = node.get("@context")
    if context is not None:
        scope = _widen(scope, added_terms(context))
    kind = node.get("type")
    known = registry.entities.get(kind) or registry.events.get(kind) if type(kind) is str else None
    if known is None:
        entity_id = node.get("id")
        if not top and _may_add(scope, kind) and type(entity_id) is str:
            return entity_id
        return node
    out = {}
    for key, value in node.items():
        if key not in known.props:
            if not _may_add(scope, key):
                out[key] = value  # refused as an unknown property, as before
            continue
        spec = known.props[key]  # None for "type"
        if spec is not None and spec[0] in _ENTITY_VALUED:
            out[key] = strip_added_terms(value, registry, scope, False)
        else:
            out[key] = value
    return out
