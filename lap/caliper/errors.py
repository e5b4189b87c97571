"""Turning pydantic validation errors into :class:`ItemProblem`s a sensor developer can act on.

pydantic reports locations through union members (``constrained-str``,
``tagged-union[...]``, the tag of the chosen member); the original JSON is
walked along the location instead, so paths are real JSON paths and the errors
of the union member that does not apply (the IRI branch for an object, the
object branch for a string) are dropped.  When an entity object has the wrong
``type``, the errors inside it are noise and only the type error is kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import models as M
from .jsonpos import join

_ARTICLE_VOWELS = "AEIOU"


@dataclass(frozen=True, slots=True)
class ItemProblem:
    """One thing wrong with a request.

    ``index`` is the position of the item in ``data`` (None for the envelope
    itself), ``path`` a JSON path from the envelope root ("$.data[3].actor.id",
    "$.sendTime") and ``message`` a sentence a sensor developer can act on.
    """

    index: int | None
    path: str
    message: str


def show(value: Any, limit: int = 80) -> str:
    """A short JSON rendering of a value for messages."""
    if type(value) in (dict, list):
        if not value:
            return "{}" if type(value) is dict else "[]"
        if not _shallow(value):
            return "{…}" if type(value) is dict else "[…]"
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shallow(value: Any, depth: int = 0) -> bool:
    """Whether a value is small and flat enough to render in a message."""
    if depth > 3:
        return False
    if type(value) is dict:
        return len(value) <= 8 and all(_shallow(v, depth + 1) for v in value.values())
    if type(value) is list:
        return len(value) <= 8 and all(_shallow(v, depth + 1) for v in value)
    return True


def article(name: str) -> str:
    """The name with "a" or "an" before it."""
    vowel_sound = name[:1] in _ARTICLE_VOWELS or name.startswith("Lti")
    return ("an " if vowel_sound else "a ") + name


def describe_types(names: tuple[str, ...]) -> str:
    if not names:
        return "an entity"
    if len(names) == 1:
        return f"{article(names[0])} (or a subtype)"
    return "one of " + ", ".join(names) + " (or their subtypes)"


@dataclass(slots=True)
class _Located:
    keys: list  # JSON keys/indexes from the item root
    nodes: list  # the values along the way: nodes[0] is the item, nodes[-1] the value at keys
    trail: list  # per key: (type of the object holding the property, property name)
    in_ref: bool  # reached through the IRI member of an entity-or-IRI union

    @property
    def node(self) -> Any:
        return self.nodes[-1]

    @property
    def owner(self) -> str | None:
        return self.trail[-1][0] if self.trail else None

    @property
    def field(self) -> str | None:
        return self.trail[-1][1] if self.trail else None


_STRING_LABELS = ("constrained-str", "str")


def _locate(item: Any, loc: tuple) -> _Located | None:
    """Walk ``item`` along a pydantic location; None if the error belongs to a branch that does not apply."""
    node = item
    at = _Located([], [item], [], False)
    for seg in loc:
        if type(node) is dict and type(seg) is str and seg in node:
            holder = node.get("type")
            at.trail.append((holder if type(holder) is str else None, seg))
            node = node[seg]
            at.in_ref = False
        elif type(node) is list and type(seg) is int and 0 <= seg < len(node):
            at.trail.append(at.trail[-1] if at.trail else (None, None))
            node = node[seg]
            at.in_ref = False
        elif type(seg) is str:
            if seg in _STRING_LABELS:
                if type(node) is dict:
                    return None  # the object member applies, not the IRI one
                at.in_ref = seg == "constrained-str"
            elif seg.startswith("tagged-union[") or (seg.endswith("Dict") and seg[:1].isupper()):
                if type(node) is not dict:
                    return None  # the IRI member applies, not the object one
            # any other label is the tag of the member chosen by "type": nothing to do
            continue
        else:
            return None
        at.keys.append(seg)
        at.nodes.append(node)
    return at


def item_problems(model_set: "M.ModelSet", index: int, item: Any, errors: list[dict]) -> list[ItemProblem]:
    """Problems for one item from the pydantic errors whose location starts inside it."""
    base = f"$.data[{index}]"
    found: list[tuple[list, str, str]] = []  # (keys, kind, message)
    for err in errors:
        loc = err["loc"]
        kind = err["type"]
        if kind == "missing":
            at = _locate(item, loc[:-1])
            if at is None:
                continue
            name = loc[-1]
            owner = at.node.get("type") if type(at.node) is dict else None
            message = f"required property '{name}' is missing"
            if type(owner) is str:
                message += f" from {article(owner)}"
            found.append((at.keys + [name], kind, message))
            continue
        at = _locate(item, loc)
        if at is None:
            continue
        if kind == "literal_error" and at.field == "type" and len(at.keys) > 1:
            # the "type" of an object standing where only one entity type is accepted
            obj_at = _Located(at.keys[:-1], at.nodes[:-1], at.trail[:-1], False)
            found.append((obj_at.keys, "wrong_type", _wrong_type(model_set, obj_at, at.node)))
            continue
        if kind == "union_tag_invalid":
            tag = at.node.get("type") if type(at.node) is dict else (err.get("ctx") or {}).get("tag")
            found.append((at.keys, "wrong_type", _wrong_type(model_set, at, tag)))
            continue
        found.append((at.keys, kind, _message(model_set, kind, err, at)))

    # An object of the wrong type: keep only that error, not the ones inside it.
    type_kinds = ("wrong_type", "union_tag_not_found")
    wrong = [keys for keys, kind, _ in found if kind in type_kinds]
    problems: list[ItemProblem] = []
    seen: dict[str, int] = {}
    for keys, kind, message in found:
        if kind not in type_kinds and any(len(keys) >= len(w) and keys[: len(w)] == w for w in wrong):
            continue
        path = base
        for key in keys:
            path = join(path, key)
        if path in seen:
            # one problem per place: several union members refusing the same value
            prev = problems[seen[path]]
            if message not in prev.message:
                problems[seen[path]] = ItemProblem(index, path, _merge(prev.message, message))
            continue
        seen[path] = len(problems)
        problems.append(ItemProblem(index, path, message))
    return problems


def _merge(first: str, second: str) -> str:
    if first.startswith("must be ") and second.startswith("must be "):
        a = first.removeprefix("must be ").split("; got ")[0]
        b = second.removeprefix("must be ")
        return f"must be {a} or {b}"
    return f"{first}; {second}"


_TYPE_WORDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "true or false",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "float_type": "a number",
}


def _message(model_set: "M.ModelSet", kind: str, err: dict, at: _Located) -> str:
    value = at.node
    field = at.field
    owner = at.owner
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        where = f" on {article(owner)}" if owner else ""
        return f"unknown property '{field}'{where}; properties not defined by Caliper belong in 'extensions'"
    if kind in _TYPE_WORDS:
        if at.in_ref and kind == "string_type":
            bases = model_set.ref_bases.get((owner, field))
            what = describe_types(bases) if bases else "an entity"
            return f"must be an IRI string or {what} object; got {show(value)}"
        return f"must be {_TYPE_WORDS[kind]}; got {show(value)}"
    if kind == "string_pattern_mismatch":
        pattern = ctx.get("pattern")
        if pattern == M.IRI_PATTERN:
            return f"{show(value)} is not a valid IRI (an absolute IRI with a scheme and no spaces, or a _: blank node)"
        if pattern == M.EVENT_ID_PATTERN:
            return f"event id {show(value)} must be a UUID URN (urn:uuid:<uuid>)"
        if pattern == M.DATETIME_PATTERN:
            return (
                f"{show(value)} is not an ISO 8601 date-time with seconds and a timezone "
                "(expected YYYY-MM-DDTHH:mm:ss.SSSZ)"
            )
        if pattern == M.DURATION_PATTERN:
            return f"{show(value)} is not an ISO 8601 duration (e.g. PT1H2M3.5S, P1D)"
        return f"{show(value)} has the wrong format"
    if kind == "greater_than_equal":
        return f"must be a non-negative integer; got {show(value)}"
    if kind == "literal_error":
        if field == "action" and owner in model_set.registry.events:
            if type(value) is not str:
                return f"action must be a string (an action term); got {show(value)}"
            allowed = ", ".join(sorted(model_set.registry.events[owner].actions))
            shown = f"'{value}'" if type(value) is str and len(value) <= 80 else show(value)
            return f"action {shown} is not allowed for {owner}; allowed: {allowed}"
        expected = str(ctx.get("expected", ""))
        terms = expected.split(", ")
        if len(terms) > 12:  # e.g. the LIS roles: name a few, not sixty
            expected = ", ".join(terms[:8]) + f", … ({len(terms) + 1} terms in all)"
        return f"{show(value)} is not an allowed value for '{field}'; allowed: {expected}"
    if kind == "union_tag_not_found":
        return "an entity object must have a 'type'"
    if kind == "caliper_decimal":
        return f"must be a decimal number with a fractional part (e.g. 15.0); got {show(value)}"
    if kind in ("recursion_loop", "recursion_depth_exceeded"):
        return "entities are nested too deeply here to be validated"
    return err.get("msg", "is invalid")


def _wrong_type(model_set: "M.ModelSet", at: _Located, tag: Any) -> str:
    """Message for an entity object whose ``type`` is not accepted where it stands."""
    holder, prop = at.owner, at.field
    registry = model_set.registry
    bases = model_set.ref_bases.get((holder, prop)) if prop else None
    expected = describe_types(bases) if bases else "another type"
    where = (f" as '{prop}'" + (f" of {article(holder)}" if holder else "")) if prop else ""
    iri = "" if bases == ("TextPositionSelector",) else " or an IRI"  # a selector has no id
    if type(tag) is not str:
        return f"an entity object must have a string 'type'; got {show(tag)}; expected {expected}{iri}"
    if tag not in registry.entities and tag not in registry.events:
        return f"{show(tag)} is not a Caliper entity type of this version; expected{where}: {expected}{iri}"
    return f"{article(tag)} is not allowed{where}; expected {expected}{iri}"
