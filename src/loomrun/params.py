"""Typed parameters: declaration, conversion from text, validation, and their wire form.

Pure functions, shared by the CLI (which validates before sending anything) and the
worker (which validates again before applying). Nothing here is ever evaluated: text
becomes a value through int(), float(), a fixed table of booleans, or json.loads.
"""

from __future__ import annotations

import copy
import difflib
import enum
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from loomrun._proto import loomrun_pb2 as pb

KINDS = {"float": float, "int": int, "bool": bool, "str": str}
# A dataclass or TypedDict (`fields`), and a dict[str, T] (`item`): see loomrun.fields.
STRUCTURED = ("struct", "map")
# The largest value loomrun carries, as sent (bytes): any value (a string, a list, a
# structured value's JSON) is refused above it, by `set` and by the worker, so that no value
# in effect is ever left out of a status or an answer.
LARGEST_VALUE = 16 << 10
_BOOLS = {
    "true": True, "false": False, "yes": True, "no": False,
    "on": True, "off": False, "1": True, "0": False,
}  # fmt: skip
_TYPE_WORDS = {
    "float": ("a float", "floats"),
    "int": ("an integer", "integers"),
    "bool": ("a boolean", "booleans"),
    "str": ("a string", "strings"),
}
INT_RANGE = (-(2**63), 2**63 - 1)  # what the wire carries (a protobuf int64)
_DIGITS = re.compile(r"[+-]?[0-9]+")
_KIND_TO_PB = {
    "float": pb.FLOAT, "int": pb.INT, "bool": pb.BOOL, "str": pb.STR,
    "struct": pb.STRUCT, "map": pb.MAP,
}  # fmt: skip
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}


class ParamError(ValueError):
    """A value that does not fit its parameter; the message is one line for a person."""


@dataclass(frozen=True)
class ParamSpec:
    """What a parameter accepts. `enum` is the worker's own Enum type, `cls` its dataclass
    or TypedDict: never sent. A struct's `fields` are named by their key alone."""

    name: str
    kind: str = "float"
    is_list: bool = False
    length: int = 0
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    doc: str = ""
    builtin: bool = False
    default: Any = None
    fields: tuple = ()
    item: ParamSpec | None = None
    optional: bool = False
    enum: type | None = field(default=None, compare=False)
    cls: type | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS and self.kind not in STRUCTURED:
            raise ValueError(f"parameter kind must be one of {', '.join(KINDS)}, not {self.kind!r}")

    @property
    def structured(self) -> bool:
        return self.kind in STRUCTURED

    @property
    def type_name(self) -> str:
        """How the expected type reads in an error message."""
        item, plural = self._words()
        if not self.is_list:
            return item
        count = f"{self.length} " if self.length else ""
        return f"a list of {count}{plural}"

    def _words(self) -> tuple[str, str]:
        """One value of this type, and several, as a message says them."""
        if self.choices:
            return ("one of " + ", ".join(_show(c) for c in self.choices),) * 2
        if self.kind == "struct":
            keys = ", ".join(f.name for f in self.fields)
            return f"an object with fields {keys}", f"objects with fields {keys}"
        if self.kind == "map":
            of = self.item._words()[1] if self.item is not None else "values"
            if self.item is not None and self.item.is_list:
                of = "lists"
            return f"an object whose values are {of}", f"objects whose values are {of}"
        return _TYPE_WORDS[self.kind]


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _fail(
    spec: ParamSpec, given: Any, expected: str | None = None, name: str | None = None
) -> ParamError:
    shown = repr(given)
    if len(shown) > 80:  # one line for a person, whatever was given
        shown = f"{shown[:60]}... ({len(shown)} characters)"
    return ParamError(
        f"invalid value for {name or spec.name}: expected {expected or spec.type_name}, got {shown}"
    )


# -- text (command line) to value ----------------------------------------------------


def _parse_scalar(spec: ParamSpec, text: str) -> Any:
    raw = text.strip()
    if spec.kind == "float":
        try:
            if not raw.isascii() or "_" in raw:  # float() takes "١.٥" and "1_0" too
                raise ValueError(raw)
            value = float(raw)
        except ValueError:
            raise _fail(spec, text, "a float (like 0.001 or 1e-3)") from None
        if not math.isfinite(value):
            raise _fail(spec, text, "a finite float")
        return value
    if spec.kind == "int":
        if not _DIGITS.fullmatch(raw):  # int() takes "٣" and "1_000" too
            raise _fail(spec, text, "an integer (like 64)")
        return int(raw, 10)
    if spec.kind == "bool":
        try:
            return _BOOLS[raw.lower()]
        except KeyError:
            raise _fail(spec, text, "a boolean (true/false, yes/no, on/off, 1/0)") from None
    return text


def parse(spec: ParamSpec, text: str) -> Any:
    """Convert command-line text to a checked value: "1e-3" -> 0.001, "0.9,0.999" -> list;
    a structured value (or a list of them) is JSON."""
    if spec.structured:
        if len(text) > LARGEST_VALUE * 4:
            raise _fail(spec, text, f"at most {LARGEST_VALUE // 1024} KiB")
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise _fail(spec, text, f"{spec.type_name}, as JSON") from None
        return check(spec, value)
    if not spec.is_list:
        return check(spec, _parse_scalar(spec, text))
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except (ValueError, RecursionError):
            raise _fail(spec, text, f"{spec.type_name} as a JSON list or comma list") from None
        if not isinstance(items, list):
            raise _fail(spec, text)
        items = [i if isinstance(i, str) or spec.kind == "str" else str(i) for i in items]
        if spec.kind == "bool":
            items = [str(i).lower() for i in items]
    else:
        items = [] if not stripped else stripped.split(",")
    return check(spec, [_parse_scalar(spec, str(i)) for i in items])


# -- typed value (from the wire, or Python) checked against the spec ---------------------


def _check_scalar(spec: ParamSpec, value: Any, name: str) -> Any:
    kind = spec.kind
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(spec, value, name=name)
        value = float(value)
        if not math.isfinite(value):
            raise _fail(spec, value, "a finite float", name)
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise _fail(spec, value, "an integer", name)
        if not INT_RANGE[0] <= value <= INT_RANGE[1]:
            raise _fail(spec, value, "an integer of 64 bits (up to 9223372036854775807)", name)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise _fail(spec, value, "a boolean", name)
    elif kind == "str":
        if not isinstance(value, str):
            raise _fail(spec, value, "a string", name)
    else:
        return _check_structure(spec, value, name)
    if spec.choices and value not in spec.choices:
        raise _fail(spec, value, name=name)
    if spec.min is not None and value < spec.min:
        raise ParamError(
            f"invalid value for {name}: {_show(value)} is below the minimum {spec.min:g}"
        )
    if spec.max is not None and value > spec.max:
        raise ParamError(
            f"invalid value for {name}: {_show(value)} is above the maximum {spec.max:g}"
        )
    return value


def _check_structure(spec: ParamSpec, value: Any, name: str) -> dict:
    """A struct's or a map's value, each field checked under its path; a struct's field
    left out takes its default (or is missing, unless optional)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _fail(spec, value, name=name)
    if spec.kind == "map":
        return {k: check(spec.item, v, field_path(name, k)) for k, v in value.items()}
    known = {f.name: f for f in spec.fields}
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParamError(
                f"invalid value for {name}: no field {key!r}{hint}; its fields: {', '.join(known)}"
            )
    out = {}
    for key, sub in known.items():
        if key in value:
            out[key] = check(sub, value[key], field_path(name, key))
        elif sub.default is not None:
            out[key] = copy.deepcopy(sub.default)
        elif not sub.optional:
            raise ParamError(
                f"invalid value for {name}: field {key!r} is missing (expected {sub.type_name})"
            )
    return out


def field_path(name: str, key: str | int) -> str:
    """The path of a field: `sched` and `warmup` -> `sched/warmup` (a key's `~` and `/`
    written `~0` and `~1`, as JSON Pointer does)."""
    return f"{name}/{str(key).replace('~', '~0').replace('/', '~1')}"


def check(spec: ParamSpec, value: Any, name: str | None = None) -> Any:
    """Validate a typed value and return it normalised (ints widen to floats, tuples to
    lists, a structure's fields left out take their defaults). `name` is where the value
    is, for the message (a field's path)."""
    top = name is None
    name = name or spec.name
    if not spec.is_list:
        if isinstance(value, list | tuple):
            raise _fail(spec, value, name=name)
        out = _check_scalar(spec, value, name)
    else:
        if not isinstance(value, list | tuple):
            raise _fail(spec, value, name=name)
        if spec.length and len(value) != spec.length:
            raise _fail(spec, value, name=name)
        out = [
            _check_scalar(spec, item, field_path(name, i) if spec.structured else name)
            for i, item in enumerate(value)
        ]
    sized = top and (spec.structured or spec.is_list or spec.kind == "str")
    if sized and (size := to_pb(out).ByteSize()) > LARGEST_VALUE:
        raise ParamError(
            f"invalid value for {name}: {size} bytes as sent, over the {LARGEST_VALUE // 1024} "
            "KiB a value may take"
        )
    return out


# -- declarations from Python annotations ------------------------------------------------


def spec_from_annotation(name: str, annotation: Any, **options: Any) -> ParamSpec:
    """A spec from a type: float, int, bool, str, Literal[...], an Enum, list/tuple of those."""
    origin = typing.get_origin(annotation)
    is_enum = isinstance(annotation, type) and issubclass(annotation, enum.Enum)
    if (origin is typing.Literal or is_enum) and options.pop("choices", ()):
        raise TypeError(f"{name}: the choices come from {annotation!r}; give no choices=")
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        length = 0
        if origin is tuple and len(typing.get_args(annotation)) == len(args) and args:
            length = len(args)
        item = spec_from_annotation(name, args[0] if args else str, **options)
        return _replace(item, is_list=True, length=length)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        kinds = {type(c) for c in choices}
        if len(kinds) != 1 or next(iter(kinds)) not in KINDS.values():
            raise TypeError(f"{name}: Literal choices must all be of one of float, int, bool, str")
        return ParamSpec(name, next(iter(kinds)).__name__, choices=tuple(choices), **options)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        names = tuple(member.name for member in annotation)
        default = options.pop("default", None)
        if isinstance(default, enum.Enum):
            default = default.name
        return ParamSpec(name, "str", choices=names, enum=annotation, default=default, **options)
    for kind, py_type in KINDS.items():
        if annotation is py_type:
            spec = ParamSpec(name, kind, **options)
            if spec.choices:
                spec = _replace(
                    spec, choices=tuple(check(_replace(spec, choices=()), c) for c in spec.choices)
                )
            return spec
    raise TypeError(
        f"{name}: cannot steer a parameter of type {annotation!r} (expected float, int, "
        "bool, str, Literal[...], an Enum, a dataclass, a TypedDict, dict[str, T], or a list "
        "of those)"
    )


def _replace(spec: ParamSpec, **changes: Any) -> ParamSpec:
    values = {f: getattr(spec, f) for f in spec.__dataclass_fields__}
    values.update(changes)
    return ParamSpec(**values)


def to_python(spec: ParamSpec, value: Any) -> Any:
    """The value a handler receives: Enum members for Enum parameters, tuples stay lists,
    a new instance of the script's own dataclass (or dict) for a structured one."""
    if spec.structured:
        from loomrun import fields

        return fields.to_python(spec, value)
    if spec.enum is not None:
        if isinstance(value, list):
            return [spec.enum[v] for v in value]
        return spec.enum[value]
    return value


# -- the wire form -------------------------------------------------------------------------


def to_pb(value: Any) -> pb.Value:
    out = pb.Value()
    if isinstance(value, bool):
        out.b = value
    elif isinstance(value, int):
        out.i = value
    elif isinstance(value, float):
        out.f = value
    elif isinstance(value, str):
        out.s = value
    elif isinstance(value, enum.Enum):
        out.s = value.name
    elif isinstance(value, list | tuple):
        out.list.SetInParent()
        out.list.items.extend(to_pb(v) for v in value)
    elif isinstance(value, dict):
        out.map.SetInParent()
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"cannot send a key of type {type(key).__name__}")
            out.map.entries.add(key=key).value.CopyFrom(to_pb(item))
    else:
        raise TypeError(f"cannot send a value of type {type(value).__name__}")
    return out


def from_pb(value: pb.Value) -> Any:
    which = value.WhichOneof("kind")
    if which is None:
        return None
    if which == "list":
        return [from_pb(v) for v in value.list.items]
    if which == "map":
        return {entry.key: from_pb(entry.value) for entry in value.map.entries}
    return getattr(value, which)


def from_field(message, field: str) -> Any:
    """A message's Value field (an answer's old or new, a part's): None when it is unset."""
    return from_pb(getattr(message, field)) if message.HasField(field) else None


def spec_to_pb(spec: ParamSpec) -> pb.ParamSpec:
    out = pb.ParamSpec(
        name=spec.name,
        kind=_KIND_TO_PB[spec.kind],
        is_list=spec.is_list,
        choices=[json.dumps(c) for c in spec.choices],
        doc=spec.doc,
        builtin=spec.builtin,
        length=spec.length,
        fields=[spec_to_pb(f) for f in spec.fields],
        optional=spec.optional,
    )
    if spec.item is not None:
        out.item.CopyFrom(spec_to_pb(spec.item))
    if spec.min is not None:
        out.min = spec.min
    if spec.max is not None:
        out.max = spec.max
    if spec.default is not None:
        out.default.CopyFrom(to_pb(spec.default))
    return out


def spec_from_pb(message: pb.ParamSpec) -> ParamSpec:
    """Read a published spec; a malformed one raises ParamError, never anything else."""
    kind = _PB_TO_KIND.get(message.kind)
    if kind is None or not message.name:
        raise ParamError(f"malformed parameter spec {message.name!r}: unknown kind")
    try:
        choices = tuple(json.loads(c) for c in message.choices)
    except ValueError:
        raise ParamError(f"malformed parameter spec {message.name!r}: bad choices") from None
    fields = tuple(spec_from_pb(f) for f in message.fields)
    item = spec_from_pb(message.item) if message.HasField("item") else None
    if (kind == "struct") != bool(fields) or (kind == "map") != (item is not None):
        raise ParamError(f"malformed parameter spec {message.name!r}: fields of a {kind}")
    return ParamSpec(
        name=message.name,
        kind=kind,
        is_list=message.is_list,
        length=message.length,
        choices=choices,
        min=message.min if message.HasField("min") else None,
        max=message.max if message.HasField("max") else None,
        doc=message.doc,
        builtin=message.builtin,
        default=from_pb(message.default) if message.HasField("default") else None,
        fields=fields,
        item=item,
        optional=message.optional,
    )


def format_value(value: Any) -> str:
    """How a value reads in a table or a message: 0.002, true, [0.9, 0.999], adam."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "-"
    return str(value)


def json_float(value: float) -> float | str:
    """A number for JSON, which has no NaN nor infinity: those as "nan", "inf", "-inf"."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value
