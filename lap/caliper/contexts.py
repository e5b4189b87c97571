"""JSON-LD ``@context`` handling: which Caliper model set an item is written against.

Rules (Caliper 1.1 and 1.2 section "JSON-LD Context"):

* a string must be a Caliper context IRI: ``.../ctx/caliper/v1p1``,
  ``.../ctx/caliper/v1p2`` or a 1.1 extension ``.../ctx/caliper/v1p1/<Profile>-extension``
  (which imports 1.1 and adds that profile's terms);
* an array may combine other remote contexts (strings) and inline contexts
  (objects) with the Caliper context, which must come last; several Caliper
  contexts may be listed if they are of one version (1.1 + extensions);
* an inline object alone (terms defined inline, as in the spec's type-coercion
  example) names no Caliper version: the item is read with the envelope's;
* no ``@context``: the item inherits the envelope's ``dataVersion``.

IRIs are compared exactly except that ``https`` is accepted for ``http`` and a
trailing slash is ignored (both appear in published Caliper material).
"""

from __future__ import annotations

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

SUPPORTED = tuple(_CANONICAL)


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
            elif _caliperish(entry):
                raise ContextError(f"'{_short(entry)}' is not a Caliper context this endpoint supports")
        elif type(entry) is not dict:
            raise ContextError(f"@context[{position}] must be a context IRI string or an inline context object")
    last = context[-1]
    if type(last) is not str or last not in SPELLINGS:
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
