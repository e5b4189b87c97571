"""pydantic v2 models for every Caliper event and entity type, built from the registry.

One *model set* per :class:`~lap.caliper.registry.Registry` (Caliper 1.2, or
Caliper 1.1 plus extension contexts).  Each event and entity type becomes a
``BaseModel`` subclass (``extra="forbid"``, ``strict=True``) whose ``type``
field is a ``Literal`` of its term and whose ``action`` (events) is a
``Literal`` of the actions the type allows.  Every entity-or-IRI property is
``Union[IRI, <allowed types discriminated on "type">]`` (left to right), so
dispatch on ``type`` happens in pydantic-core, O(1), with no Python code on the
hot path.  The only Python validators are the decimals': one refuses JSON
integers (pydantic's strict float accepts ints; the 1.2 fixtures do not), the
other, of 1.1 and of sets built with whole numbers allowed, takes them.

The same types are also generated as TypedDicts and compiled into one
validator per set, :attr:`ModelSet.item_list` (a list of a discriminated union of
every top-level item type), which is what :func:`lap.caliper.parse_envelope`
uses: it returns plain dicts and is about three times faster than building the
``BaseModel`` instances (see :class:`ModelSet`).  Sets are built once: eagerly
for 1.1 and 1.2 at import, lazily for 1.1 + extension combinations.
"""

from __future__ import annotations

import keyword
import sys
import threading
from dataclasses import dataclass
from typing import Annotated, Any, ForwardRef, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StringConstraints, TypeAdapter
from pydantic_core import PydanticCustomError
from typing_extensions import NotRequired, Required, TypedDict

from . import vocab as V
from .registry import Registry, build_registry, registry_key

# --- scalar types ------------------------------------------------------------

# An absolute IRI (scheme ":" rest, no whitespace or characters RFC 3987 excludes)
# or a JSON-LD blank node identifier.
IRI_PATTERN = r'^(?:[A-Za-z][A-Za-z0-9+.\-]*:[^\s<>"{}|\\^`\x00-\x1f\x7f]+|_:[^\s]+)$'
EVENT_ID_PATTERN = r"^urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
# ISO 8601 / RFC 3339 date-time: seconds required, any fraction, and a zone:
# "Z" or an offset.  Days are checked against their month (29 February is let
# through in every year; event and send times are parsed in full later).
_DATE = (
    r"\d{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])"
    r"|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
    r"|02-(?:0[1-9]|1\d|2\d))"
)
DATETIME_PATTERN = "^" + _DATE + r"T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d+)?(?:Z|[+-](?:[01]\d|2[0-3]):?[0-5]\d)$"
# ISO 8601 duration (PnYnMnDTnHnMnS or PnW), at least one component, the time
# part introduced by T; decimal fractions allowed.
_N = r"\d+(?:[.,]\d+)?"
_DATE_PART = rf"(?:{_N}Y(?:{_N}M)?(?:{_N}D)?|{_N}M(?:{_N}D)?|{_N}D)"
_TIME_PART = rf"T(?:{_N}H(?:{_N}M)?(?:{_N}S)?|{_N}M(?:{_N}S)?|{_N}S)"
DURATION_PATTERN = rf"^P(?:{_DATE_PART}(?:{_TIME_PART})?|{_TIME_PART}|{_N}W)$"

IRI = Annotated[str, StringConstraints(pattern=IRI_PATTERN)]
EventId = Annotated[str, StringConstraints(pattern=EVENT_ID_PATTERN)]
DateTimeStr = Annotated[str, StringConstraints(pattern=DATETIME_PATTERN)]
DurationStr = Annotated[str, StringConstraints(pattern=DURATION_PATTERN)]


MAX_DECIMAL = 1e15  # far beyond any score or metric; keeps sums of them finite downstream


def _decimal(value: Any) -> float:
    # JSON gives an int for "15" and a float for "15.0"; Caliper decimals must be the latter.
    if type(value) is float:
        if abs(value) <= MAX_DECIMAL:
            return value
        raise PydanticCustomError("caliper_decimal_range", "must be between -1e15 and 1e15")
    raise PydanticCustomError("caliper_decimal", "must be a decimal number with a fractional part (e.g. 15.0)")


def _whole_or_decimal(value: Any) -> float:
    # JSON has one number type, and JavaScript writes 15.0 as 15: where whole numbers are allowed, 15 means 15.0
    if type(value) is int:
        if abs(value) <= MAX_DECIMAL:
            return float(value)
        raise PydanticCustomError("caliper_decimal_range", "must be between -1e15 and 1e15")
    return _decimal(value)


Decimal = Annotated[float, PlainValidator(_decimal, json_schema_input_type=float)]
WholeOrDecimal = Annotated[float, PlainValidator(_whole_or_decimal, json_schema_input_type=float)]
NonNegativeInt = Annotated[int, Field(ge=0)]
JsonObject = dict[str, Any]
LocalContext = Union[str, list[Union[str, JsonObject]], JsonObject]

_CONFIG = ConfigDict(strict=True, extra="forbid", defer_build=True, validate_by_alias=True, validate_by_name=False)
_TD_CONFIG = ConfigDict(strict=True, extra="forbid")
_SCALARS = {
    "str": str,
    "iri": IRI,
    "event_id": EventId,
    "datetime": DateTimeStr,
    "duration": DurationStr,
    "int": int,
    "nnint": NonNegativeInt,
    "decimal": Decimal,
    "bool": bool,
    "object": JsonObject,
    "strings": list[str],
    "context": LocalContext,
}


class CaliperModel(BaseModel):
    """Base of every generated Caliper model."""

    model_config = _CONFIG


@dataclass(frozen=True)
class ModelSet:
    """Everything needed to validate items of one Caliper version (plus 1.1 extensions).

    ``models`` are the public pydantic ``BaseModel`` classes, one per event and
    entity type (validate with :func:`public_validator` or :func:`build_model`).
    ``item_list`` is the hot-path validator of a list of items: a discriminated
    union of the same types generated as TypedDicts (identical field types
    and rules, output plain dicts), because building ``BaseModel`` instances
    fills in every unset optional field of every nested entity and costs about
    three times more per event (measured: ~48 vs ~15 µs per fixture event on the
    reference machine).
    """

    registry: Registry
    models: dict[str, type[CaliperModel]]
    item_list: TypeAdapter
    # type term -> True for an event type, False for an entity (describe) type
    kinds: dict[str, bool]
    # (owner type, property) -> the type names a ref property accepts, for messages
    ref_bases: dict[tuple[str, str], tuple[str, ...]]


def _python_name(prop: str) -> str:
    """The attribute name of a property on the public models ("@context" -> "context")."""
    name = "".join(c for c in prop if c.isalnum() or c == "_")
    if keyword.iskeyword(name) or hasattr(BaseModel, name) or name.startswith("model_"):
        name += "_"
    return name


class _Builder:
    """Turns a registry into annotated types, as BaseModels or as TypedDicts."""

    def __init__(self, registry: Registry, typed_dict: bool, suffix: str, whole_numbers: bool = False):
        self.registry = registry
        self.whole_numbers = whole_numbers  # a decimal may be written as a whole number
        self.typed_dict = typed_dict
        self.suffix = suffix  # keeps the two flavours' forward references apart
        self.discriminator = "type"
        self.unions: dict[tuple[str, ...], Any] = {}
        self.ref_bases: dict[tuple[str, str], tuple[str, ...]] = {}
        self.types: dict[str, Any] = {}

    def fwd(self, name: str) -> ForwardRef:
        return ForwardRef(name + self.suffix)

    def tagged(self, bases: tuple[str, ...]) -> Any:
        names = self.registry.concrete(bases)
        if names not in self.unions:
            refs = [self.fwd(n) for n in names]
            if len(refs) == 1:
                self.unions[names] = refs[0]
            else:
                self.unions[names] = Annotated[Union[tuple(refs)], Field(discriminator=self.discriminator)]
        return self.unions[names]

    def ref(self, bases: tuple[str, ...]) -> Any:
        return Annotated[Union[IRI, self.tagged(bases)], Field(union_mode="left_to_right")]

    def annotation(self, owner: str, prop: str, spec: tuple) -> Any:
        kind = spec[0]
        if kind == "decimal" and self.whole_numbers:
            return WholeOrDecimal
        if kind in _SCALARS:
            return _SCALARS[kind]
        if kind == "ref":
            self.ref_bases[(owner, prop)] = spec[1]
            return self.ref(spec[1])
        if kind == "refs":
            self.ref_bases[(owner, prop)] = spec[1]
            return list[self.ref(spec[1])]
        if kind == "enum":
            return Literal[spec[2]]
        if kind == "enums":
            return list[Literal[spec[2]]]
        if kind == "selector":
            self.ref_bases[(owner, prop)] = ("TextPositionSelector",)
            return self.fwd("TextPositionSelector")
        if kind == "sysids":
            self.ref_bases[(owner, prop)] = ("SystemIdentifier",)
            return list[self.ref(("SystemIdentifier",))]
        raise ValueError(f"unknown property kind {kind!r}")

    def make(self, name: str, props: dict[str, tuple], required: frozenset[str], overrides: dict) -> None:
        fields: dict[str, tuple[Any, bool]] = {}
        for prop, spec in props.items():
            if prop == "type":
                ann = Literal[(name,)]
            elif prop in overrides:
                ann = overrides[prop]
            else:
                ann = self.annotation(name, prop, spec)
            fields[prop] = (ann, prop in required or prop == "type")
        if self.typed_dict:
            keys = {p: (Required[a] if req else NotRequired[a]) for p, (a, req) in fields.items()}
            td = TypedDict(name + self.suffix, keys)
            td.__pydantic_config__ = _TD_CONFIG
            self.types[name] = td
            return
        annotations: dict[str, Any] = {}
        ns: dict[str, Any] = {"__module__": __name__, "__qualname__": name}
        for prop, (ann, req) in fields.items():
            key = _python_name(prop)
            if req:
                annotations[key] = ann
                ns[key] = Field(alias=prop)
            else:
                annotations[key] = Optional[ann]
                ns[key] = Field(default=None, alias=prop)
        ns["__annotations__"] = annotations
        self.types[name] = type(name + self.suffix, (CaliperModel,), ns)

    def build_all(self) -> dict[str, Any]:
        reg = self.registry
        for name, et in reg.entities.items():
            self.make(name, et.props, et.required, {})
        for name, ev in reg.events.items():
            self.make(name, ev.props, ev.required, {"action": Literal[tuple(sorted(ev.actions))]})
        namespace = {name + self.suffix: t for name, t in self.types.items()}
        if not self.typed_dict:
            for model in self.types.values():
                model.__name__ = model.__name__[: -len(self.suffix)] if self.suffix else model.__name__
                # forward references between the models resolve in this set's namespace
                model.__pydantic_parent_namespace__ = namespace
        self.namespace = namespace
        return self.types


def _build(registry: Registry, whole_numbers: bool) -> ModelSet:
    public = _Builder(registry, typed_dict=False, suffix="", whole_numbers=whole_numbers)
    models = public.build_all()
    fast = _Builder(registry, typed_dict=True, suffix="Dict", whole_numbers=whole_numbers)
    dicts = fast.build_all()
    union = Annotated[Union[tuple(dicts.values())], Field(discriminator="type")]

    def build():
        many = TypeAdapter(list[union])
        many.rebuild(force=True, raise_errors=True, _types_namespace=fast.namespace)
        return many

    item_list = _deep(build)
    for model in models.values():
        model.__pydantic_parent_namespace__ = public.namespace
    kinds = {name: False for name in registry.entities} | {name: True for name in registry.events}
    return ModelSet(registry, models, item_list, kinds, fast.ref_bases)


_public_lists: dict[int, TypeAdapter] = {}


def public_validator(model_set: ModelSet) -> TypeAdapter:
    """A validator of ``list[<any item type>]`` that returns the public ``BaseModel`` instances.

    Slower than :attr:`ModelSet.item_list` (see there); built once per set on first use.
    """
    key = id(model_set)  # sets are cached for good; two sets may share a registry (whole-number decimals or not)
    if key not in _public_lists:
        namespace = next(iter(model_set.models.values())).__pydantic_parent_namespace__
        union = Annotated[Union[tuple(model_set.models.values())], Field(discriminator="type")]

        def build():
            adapter = TypeAdapter(list[union])
            adapter.rebuild(force=True, raise_errors=True, _types_namespace=namespace)
            return adapter

        _public_lists[key] = _deep(build)
    return _public_lists[key]


def build_model(model: type[CaliperModel]) -> type[CaliperModel]:
    """Complete a public model class (they are built on first use; this is the safe way)."""
    if not model.__pydantic_complete__:
        namespace = model.__pydantic_parent_namespace__
        _deep(lambda: model.model_rebuild(force=True, raise_errors=True, _types_namespace=namespace))
    return model


def _deep(build):
    """Run ``build`` where deep recursion is safe.

    The models refer to each other in long chains (an Event's object is an
    Entity whose isPartOf is an Entity whose ...) and pydantic generates their
    schema recursively, deeper than the default recursion limit; so the build
    runs once per model set in a thread with a large stack and a higher limit.
    """
    result: list = []
    failure: list = []

    def run():
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(max(old, 20000))
        try:
            result.append(build())
        except BaseException as exc:  # re-raised in the calling thread
            failure.append(exc)
        finally:
            sys.setrecursionlimit(old)

    previous = threading.stack_size(256 * 1024 * 1024)
    try:
        worker = threading.Thread(target=run, name="caliper-model-build")
        worker.start()
    finally:
        threading.stack_size(previous)
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


_sets: dict[str, ModelSet] = {}
_lock = threading.Lock()


def model_set(version: str, extensions: frozenset[str] = frozenset(), whole_numbers: bool = False) -> ModelSet:
    """The model set of a Caliper version plus (1.1 only) extension contexts; built once, cached.

    Decimals may be written as whole numbers (15 for 15.0) in 1.1 always, as
    its sensors do (IMS's own JavaScript sensor among them), and in 1.2 only
    with `whole_numbers`: 1.2's conformance fixtures call them malformed.
    """
    whole_numbers = whole_numbers or version == V.CALIPER_V1P1
    key = registry_key(version, extensions) + ("/whole" if whole_numbers else "")
    found = _sets.get(key)
    if found is None:
        with _lock:
            found = _sets.get(key)
            if found is None:
                found = _sets[key] = _build(build_registry(version, extensions), whole_numbers)
    return found


# Built at import: the two core sets (the endpoint's first request must not pay for it).
V1P1 = model_set(V.CALIPER_V1P1)
V1P2 = model_set(V.CALIPER_V1P2)
