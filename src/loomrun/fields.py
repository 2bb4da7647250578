"""Structured parameters: dataclasses (nested ones too), TypedDicts and dict[str, T], and
lists of them; a field by its path; per-field bounds and docs.

A path is the parameter's name, then each key after a `/` (JSON Pointer's syntax,
RFC 6901): `sched/warmup`, `aug/p`, `blocks/0/width`. A key that holds `/` writes it
`~1`, one that holds `~` writes it `~0`; a dot in a key is a dot (`aug/p.x`), so a path
can never read as `lr.0` (a param group's lr, the one name with a dot).

On the wire and inside loomrun a structured value is plain data: a dict of its fields in
order (lists stay lists, an Enum is its name). The script gets a new instance of its own
type built from it on every change, never loomrun's copy and never a half-updated one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import re
import typing
from dataclasses import dataclass
from typing import Any

from loomrun import params as P

DEEPEST = 8  # dataclasses within dataclasses: deeper is refused (and a cycle with it)


@dataclass(frozen=True)
class Field:
    """Bounds, choices and a doc for one field, next to its type:

        warmup: Annotated[int, loomrun.Field(min=0, doc="steps of linear warm-up")] = 100

    It works the same on a dataclass field, a TypedDict key, the T of dict[str, T] and a
    parameter's own type."""

    min: float | None = None
    max: float | None = None
    choices: tuple = ()
    doc: str = ""


# -- paths ---------------------------------------------------------------------------------


join = P.field_path


def unescape(key: str) -> str:
    return key.replace("~1", "/").replace("~0", "~")


# A list's index in a path: ASCII digits, no leading zero (so one item has one name).
_INDEX = re.compile(r"0|[1-9][0-9]*")


def is_index(key: str) -> bool:
    return _INDEX.fullmatch(key) is not None


def split(name: str) -> tuple[str, list[str]]:
    """`sched/warmup` -> ("sched", ["warmup"]); `lr` -> ("lr", [])."""
    base, *keys = name.split("/")
    return base, [unescape(k) for k in keys]


def base(name: str) -> str:
    """The parameter a name is of: `sched/warmup` -> `sched`."""
    return name.split("/", 1)[0]


def overlapping(names) -> str:
    """Why some names of one change touch one value twice ("" when none do): the whole
    and a field of it, or a field and a field within it."""
    ordered = sorted(names)
    for i, name in enumerate(ordered):
        for other in ordered[i + 1 :]:
            if other.startswith(name + "/"):
                return (
                    f"{other} is inside {name}, which the same change sets: set the whole "
                    "value, or its fields"
                )
    return ""


def field_spec(spec: P.ParamSpec, keys: list[str]) -> P.ParamSpec:
    """The spec of the field at `keys` within `spec`; ParamError names the path and what
    the value there has."""
    path, here = spec.name, spec
    if keys and not spec.structured:
        raise P.ParamError(f"no field {join(path, keys[0])!r}: {path} is {spec.type_name}")
    for key in keys:
        if here.is_list:
            if not is_index(key):
                raise P.ParamError(f"no field {join(path, key)!r}: {path} is a list (0, 1, ...)")
            here = P._replace(here, is_list=False, length=0)
        elif here.kind == "struct":
            known = {f.name: f for f in here.fields}
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f" (did you mean {join(path, close[0])!r}?)" if close else ""
                raise P.ParamError(
                    f"no field {join(path, key)!r}{hint}; {path} has: {', '.join(known)}"
                )
            here = known[key]
        elif here.kind == "map":
            here = here.item
        else:
            raise P.ParamError(f"no field {join(path, key)!r}: {path} is {here.type_name}")
        path = join(path, key)
    return P._replace(here, name=path)


def value_at(value: Any, keys: list[str]) -> Any:
    """The part of a plain value at `keys` (None where there is none)."""
    for key in keys:
        if isinstance(value, list):
            index = int(key) if is_index(key) else len(value)
            value = value[index] if index < len(value) else None
        elif isinstance(value, dict):
            value = value.get(key)
        else:
            return None
    return value


def patched(spec: P.ParamSpec, value: Any, keys: list[str], new: Any) -> Any:
    """A copy of `value` with `new` at `keys`: a dict's new key is added; a list's index
    must be one it has. Checked against the spec afterwards by the caller."""
    name = spec.name
    if value is None:
        raise P.ParamError(f"{name} has no value yet whose fields could change: set it whole")
    out = copy.deepcopy(value)
    here, path = out, name
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(here, list):
            index = int(key) if is_index(key) else len(here)
            if index >= len(here):
                raise P.ParamError(
                    f"no field {join(path, key)!r}: {path} has {len(here)} items in effect"
                )
            if last:
                here[index] = new
            here = here[index]
        elif isinstance(here, dict):
            if last:
                here[key] = new
            elif key not in here:
                raise P.ParamError(f"no field {join(path, key)!r}: {path} has no {key!r} in effect")
            here = here[key]
        path = join(path, key)
    return out


# -- declarations ----------------------------------------------------------------------------


def _options_of(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """`Annotated[T, loomrun.Field(...)]` -> (T, its options); anything else as it is."""
    if typing.get_origin(annotation) is not typing.Annotated:
        return annotation, {}
    inner, *extras = typing.get_args(annotation)
    marks = [e for e in extras if isinstance(e, Field)]
    if not marks:
        return inner, {}
    mark = marks[-1]
    return inner, {
        "min": mark.min, "max": mark.max, "choices": tuple(mark.choices), "doc": mark.doc
    }  # fmt: skip


def is_structure(annotation: Any) -> bool:
    annotation, _ = _options_of(annotation)
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return any(is_structure(a) for a in typing.get_args(annotation) if a is not Ellipsis)
    return (
        origin is dict
        or typing.is_typeddict(annotation)
        or (isinstance(annotation, type) and dataclasses.is_dataclass(annotation))
    )


def spec_of(name: str, annotation: Any, depth: int = 0, **options: Any) -> P.ParamSpec:
    """A spec from any type loomrun takes, structured or not, with Annotated options."""
    annotation, marked = _options_of(annotation)
    for key, value in marked.items():
        if value not in (None, (), ""):
            options[key] = value
    if depth > DEEPEST:
        raise TypeError(f"{name}: structures nested deeper than {DEEPEST} (a cycle?)")
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if is_structure(annotation):
            if len({repr(a) for a in args}) != 1:
                raise TypeError(
                    f"{name}: a list of structures takes one item type, not {annotation!r}"
                )
            default = options.pop("default", None)
            spec = P._replace(spec_of(name, args[0], depth + 1, **options), is_list=True)
            spec = P._replace(spec, default=None)
            if default is not None:
                spec = P._replace(spec, default=P.check(spec, to_wire(default)))
            return spec
        inner = [_options_of(a) for a in args]  # list[Annotated[float, Field(...)]]
        for _, marked in inner:
            options.update({k: v for k, v in marked.items() if v not in (None, (), "")})
        if args and any(marked for _, marked in inner):
            stripped = [a for a, _ in inner]
            annotation = origin[tuple(stripped)] if origin is tuple else list[stripped[0]]
    if not is_structure(annotation):
        return P.spec_from_annotation(name, annotation, **options)
    for option in ("min", "max"):
        if options.get(option) is not None:
            raise TypeError(f"{name}: {option}= is for numbers; give it to a field")
    if options.get("choices"):
        raise TypeError(f"{name}: choices= is for a field, not a structure")
    doc, default = options.get("doc", ""), options.get("default")
    if origin is dict:
        key_type, value_type = typing.get_args(annotation) or (str, Any)
        if key_type is not str:
            raise TypeError(f"{name}: a dict parameter has str keys, not {key_type!r}")
        item = P._replace(spec_of(join(name, "*"), value_type, depth + 1), name="*")
        spec = P.ParamSpec(name, "map", item=item, doc=doc, cls=dict)
    else:
        spec = P.ParamSpec(
            name, "struct", fields=_fields_of(name, annotation, depth), doc=doc, cls=annotation
        )
    if default is None and dataclasses.is_dataclass(annotation):
        try:
            default = annotation()
        except TypeError:  # a field without a default: no default for the whole
            default = None
    if default is not None:
        spec = P._replace(spec, default=P.check(spec, to_wire(default)))
    return spec


def _fields_of(name: str, cls: type, depth: int) -> tuple[P.ParamSpec, ...]:
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception as error:  # noqa: BLE001 - a name the annotations cannot resolve
        raise TypeError(
            f"{name}: cannot read the annotations of {cls.__name__} ({error})"
        ) from None
    out = []
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default = None
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            out.append(_field(name, f.name, hints[f.name], depth, default, optional=False))
    else:
        required = getattr(cls, "__required_keys__", frozenset(hints))
        for key, hint in hints.items():
            optional = key not in required or typing.get_origin(hint) is typing.NotRequired
            if typing.get_origin(hint) in (typing.Required, typing.NotRequired):
                hint = typing.get_args(hint)[0]  # (read from a string, not in the keys)
            out.append(_field(name, key, hint, depth, None, optional=optional))
    if not out:
        raise TypeError(f"{name}: {cls.__name__} has no fields to steer")
    return tuple(out)


def _field(parent: str, key: str, hint: Any, depth: int, default: Any, optional: bool):
    """A field's spec, named by its key (a message names its whole path)."""
    spec = P._replace(spec_of(join(parent, key), hint, depth + 1), name=key)
    if default is not None:
        try:
            spec = P._replace(spec, default=P.check(spec, to_wire(default), join(parent, key)))
        except P.ParamError as error:
            raise TypeError(str(error)) from None
    return P._replace(spec, optional=optional)


# -- values ------------------------------------------------------------------------------------


def to_wire(value: Any) -> Any:
    """The script's value as plain data: a dataclass as a dict of its fields, an Enum as
    its name, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kept = [f.name for f in dataclasses.fields(value) if f.init]
        return {name: to_wire(getattr(value, name)) for name in kept}
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.name
    return value


def to_python(spec: P.ParamSpec, value: Any) -> Any:
    """A new value of the script's own types from plain data: its dataclass, built anew
    with its nested ones; a new dict; Enum members."""
    if spec.is_list:
        one = P._replace(spec, is_list=False, length=0)
        return [to_python(one, v) for v in value]
    if spec.kind == "map":
        return {k: to_python(spec.item, v) for k, v in value.items()}
    if spec.kind == "struct":
        built = {f.name: to_python(f, value[f.name]) for f in spec.fields if f.name in value}
        return spec.cls(**built) if dataclasses.is_dataclass(spec.cls) else built
    if spec.enum is not None:
        return spec.enum[value]
    return value
