"""The vocabulary a policy field is declared in, once, beside its model attribute.

Rules:
- A model class that a policy file holds is declared with `@section(name, description)`, which
  makes it a frozen dataclass with slots. Each attribute a file sets is declared with
  `setting(spec, description, default=...)`, a `dataclasses.field` that also carries its
  constraints and description. Its default is the dataclass default and nothing else: every
  other place that needs it (schema, docs, checks) reads it from there.
- The decorator derives, from the class's fields, the `Obj` table that everything else uses: the
  YAML walker checks files against it (`document.py`), the JSON Schema and the reference doc
  are rendered from it (`schema.py`, `reference.py`), and `build()` turns walked data into the
  model with it. Nothing else declares a key, a type, a range or a default.
- A YAML key is the attribute's name unless `setting(key=...)` says otherwise. A key with no
  attribute of its own (a bucket's `per`) is declared in `section(extra=...)`, and the
  section's `adapt` folds it into the attributes.
- String specs keep to the subset of regex syntax that Python and ECMA-262 (what JSON Schema
  validators use) read the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, TypeAlias, TypeVar, dataclass_transform, overload

_T = TypeVar("_T")
_METADATA_KEY = "policy"


@dataclass(frozen=True, slots=True)
class Str:
    min_length: int = 0
    max_length: int | None = None
    pattern: str | None = None  # matched with re.fullmatch
    pattern_hint: str = ""  # what a matching value looks like, for error messages
    lower: bool = False  # normalised to lower case once valid
    # Never echo the value in an error: someone may have pasted a plain API key where its
    # digest belongs, and errors end up in logs and CI output.
    secret: bool = False


@dataclass(frozen=True, slots=True)
class Int:
    minimum: int | None = None


@dataclass(frozen=True, slots=True)
class Num:
    """A finite int or float (YAML `.inf` and `.nan` are refused); built as a float."""

    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True, slots=True)
class Bool:
    """`true` or `false` (YAML 1.1's yes/no/on/off are refused: too easy to misread)."""


@dataclass(frozen=True, slots=True)
class Choice:
    """One of a fixed set of strings; converted to a member of `enum` when one is given."""

    values: tuple[str, ...]
    enum: type[Enum] | None = None

    @classmethod
    def of(cls, enum_type: type[Enum]) -> Choice:
        return cls(tuple(str(m.value) for m in enum_type), enum_type)


@dataclass(frozen=True, slots=True)
class ListOf:
    """A YAML list; built as the tuple or frozenset its attribute is annotated with."""

    item: Spec
    min_items: int = 0


@dataclass(frozen=True, slots=True)
class MapOf:
    """A mapping from names the user picks (class names, tenant names) to values."""

    key: Str
    value: Spec
    # What one entry is called in messages ("class", "tenant"). Named entries may be defined
    # once across all files; the loader reports a second definition with both places.
    entity: str


@dataclass(frozen=True, slots=True)
class Setting:
    """What a dataclass field's metadata says about the YAML key that sets it."""

    spec: Spec
    description: str = ""
    key: str | None = None  # the YAML key; None: the attribute's name
    # None: required exactly when the attribute has no default. False for an attribute the
    # model always needs but a file may leave out (filled in by `adapt`, or an empty section).
    required: bool | None = None


@overload
def setting(
    spec: Spec,
    description: str = "",
    *,
    default: _T,
    key: str | None = None,
    required: bool | None = None,
) -> _T: ...
@overload
def setting(
    spec: Spec,
    description: str = "",
    *,
    default_factory: Callable[[], _T],
    key: str | None = None,
    required: bool | None = None,
) -> _T: ...
@overload
def setting(
    spec: Spec, description: str = "", *, key: str | None = None, required: bool | None = None
) -> Any: ...
def setting(
    spec: Spec,
    description: str = "",
    *,
    key: str | None = None,
    required: bool | None = None,
    **default: Any,
) -> Any:
    """A `@section` field that policy files set: `dataclasses.field(default=...)` plus what the
    file may hold there (`spec`) and what it means (`description`)."""
    metadata = {_METADATA_KEY: Setting(spec, description, key, required)}
    return dataclasses.field(metadata=metadata, **default)


@dataclass(frozen=True, slots=True)
class Field:
    """One key of a section, as derived from its attribute (or declared in `extra`)."""

    spec: Spec
    required: bool = False
    description: str = ""
    # The default shown in the schema and docs and used by checks: the model's default when it
    # is a plain value (an enum member, a string or a number); None otherwise.
    default: object = None
    attr: str | None = None  # the model attribute it sets; None for a key of `extra`
    # The model builds an absent, optional section with no default of its own from `{}`.
    empty_when_absent: bool = False
    collect: type[tuple[Any, ...]] | type[frozenset[Any]] = tuple  # for a ListOf


@dataclass(frozen=True, slots=True)
class Rule:
    """When `when_key` holds one of `when_values`, `require` keys must and `forbid` keys must
    not be present."""

    when_key: str
    when_values: tuple[str, ...]
    require: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Exclusive:
    """The two `keys` must not both be present: they are two ways of giving the same thing."""

    keys: tuple[str, str]


@dataclass(frozen=True, slots=True)
class Obj:
    """A section of a policy file (a YAML mapping with fixed keys) and the model it builds."""

    name: str  # the $defs name in the schema, the heading in the reference
    fields: Mapping[str, Field]
    description: str = ""
    rules: tuple[Rule | Exclusive, ...] = ()
    cls: type[Any] | None = None
    # Turns the keyword arguments read from YAML into the model's, where they differ.
    adapt: Callable[[dict[str, Any]], None] | None = None

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(k for k, f in self.fields.items() if f.required)


Spec: TypeAlias = Str | Int | Num | Bool | Choice | ListOf | MapOf | Obj

_SECTIONS: dict[type[Any], Obj] = {}


@dataclass_transform(frozen_default=True, field_specifiers=(setting, dataclasses.field))
def section(
    name: str,
    description: str,
    *,
    rules: tuple[Rule | Exclusive, ...] = (),
    extra: Mapping[str, Field] | None = None,
    key_order: tuple[str, ...] | None = None,
    adapt: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[type[_T]], type[_T]]:
    """Class decorator: the class is a frozen dataclass with slots, and a section of a policy
    file whose keys are its `setting` fields.

    `key_order` lists the YAML keys when they should not follow the attributes' order (the
    order of the schema's properties and of "allowed:" in messages).
    """

    def register(plain: type[_T]) -> type[_T]:
        cls = dataclass(frozen=True, slots=True)(plain)
        fields = dict(_settings(cls))
        fields.update(extra or {})
        if key_order is not None:
            if set(key_order) != set(fields):
                raise TypeError(f"{cls.__name__}: key_order must list exactly {sorted(fields)}")
            fields = {key: fields[key] for key in key_order}
        _SECTIONS[cls] = Obj(name, MappingProxyType(fields), description, rules, cls, adapt)
        return cls

    return register


def section_spec(cls: type[Any]) -> Obj:
    """The `Obj` derived from a `@section` class."""
    return _SECTIONS[cls]


def _settings(cls: type[Any]) -> list[tuple[str, Field]]:
    out = []
    for fld in dataclasses.fields(cls):
        found = fld.metadata.get(_METADATA_KEY)
        if found is None:
            continue  # set by the loader, not by a file (a class's name is its key)
        has_default = (
            fld.default is not dataclasses.MISSING or fld.default_factory is not dataclasses.MISSING
        )
        required = not has_default if found.required is None else found.required
        default = fld.default if _is_plain(fld.default) else None
        collect: type[tuple[Any, ...]] | type[frozenset[Any]] = tuple
        if isinstance(found.spec, ListOf):
            # A string under `from __future__ import annotations`, and str() of a type reads
            # the same: "frozenset[str]", "tuple[BucketPolicy, ...]".
            outer = str(fld.type).partition("[")[0]
            if outer not in ("tuple", "frozenset"):
                raise TypeError(f"{cls.__name__}.{fld.name}: a list is a tuple or a frozenset")
            collect = frozenset if outer == "frozenset" else tuple
        empty = not required and not has_default and isinstance(found.spec, Obj)
        key = found.key or fld.name
        out.append(
            (key, Field(found.spec, required, found.description, default, fld.name, empty, collect))
        )
    return out


def _is_plain(value: object) -> bool:
    return isinstance(value, Enum | str | int | float | bool)


def build(obj: Obj, data: Mapping[str, Any], **context: Any) -> Any:
    """The model object for `data`, a section walked without a problem.

    `context` sets the attributes that no key sets (a class's `name`, a policy's `version`).
    Absent keys are left to the model's defaults.
    """
    assert obj.cls is not None, f"{obj.name} builds no model"
    kwargs: dict[str, Any] = dict(context)
    for key, fld in obj.fields.items():
        if key in data:
            value = _convert(fld.spec, data[key], fld.collect)
        elif fld.attr is None:
            value = fld.default
        elif fld.empty_when_absent:
            assert isinstance(fld.spec, Obj)
            value = build(fld.spec, {})
        else:
            continue
        kwargs[key if fld.attr is None else fld.attr] = value
    if obj.adapt is not None:
        obj.adapt(kwargs)
    return obj.cls(**kwargs)


def _convert(spec: Spec, value: Any, collect: type[Any] = tuple) -> Any:
    if isinstance(spec, Obj):
        return build(spec, value)
    if isinstance(spec, Num):
        return float(value)  # YAML reads `4` as an int; the model's numbers are floats
    if isinstance(spec, ListOf):
        return collect(_convert(spec.item, item) for item in value)
    if isinstance(spec, MapOf):
        entry = spec.value
        if isinstance(entry, Obj) and _named_by_key(entry):
            return MappingProxyType({k: build(entry, v, name=k) for k, v in value.items()})
        return MappingProxyType({k: _convert(entry, v) for k, v in value.items()})
    return value


def _named_by_key(obj: Obj) -> bool:
    """Whether the model's `name` is the key the section is filed under."""
    assert obj.cls is not None
    return any(
        fld.name == "name" and _METADATA_KEY not in fld.metadata
        for fld in dataclasses.fields(obj.cls)
    )


# Names end up in HTTP headers, metric labels and log lines: any printable text, but no
# control characters or line separators (which would let a name forge a header or a log line).
NAME = Str(
    min_length=1,
    max_length=128,
    pattern=r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]+$",
    pattern_hint="free of control characters and line separators",
)
# Bucket names go into store keys and metric labels, so they stay short and plain.
BUCKET_NAME = Str(
    min_length=1,
    max_length=32,
    pattern=r"^[a-z0-9_-]{1,32}$",
    pattern_hint="1 to 32 of a-z, 0-9, '_' and '-'",
)
# RFC 9110 token characters. Envoy hands header names to the sidecar in lower case, so the
# loader lower-cases them too and a policy written `X-Api-Key` still matches.
HEADER_NAME = Str(
    min_length=1,
    pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$",
    pattern_hint="a header name (letters, digits and !#$%&'*+-.^_`|~)",
    lower=True,
)
SHA256_HEX = Str(
    min_length=64,
    max_length=64,
    pattern=r"^[0-9a-fA-F]{64}$",
    pattern_hint="64 hex digits (the SHA-256 digest of the key, not the key itself)",
    lower=True,
    secret=True,
)
NON_EMPTY = Str(min_length=1)
