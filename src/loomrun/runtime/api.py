"""The worker-facing API, re-exported as `loomrun.param`, `loomrun.handler`, ...

Declarations publish a typed schema (so `loomrun set` can check a value before sending
it) and register where a change goes. Outside loomrun every call is a cheap no-op.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
import typing
import weakref
from collections.abc import Callable
from typing import Any

from loomrun import params as P
from loomrun.fields import spec_of, to_wire
from loomrun.runtime import worker as _worker
from loomrun.runtime.target import Target
from loomrun.subjects import OWN_NAMES


class Param:
    """A declared parameter; `.value` is its live value."""

    def __init__(self, spec: P.ParamSpec):
        self.spec = spec
        self.value = P.to_python(spec, spec.default) if spec.default is not None else None

    def _get(self) -> Any:
        return self.spec.default if self.value is None else to_wire(self.value)

    def _put(self, value: Any) -> None:
        self.value = P.to_python(self.spec, value)

    def __repr__(self) -> str:
        return f"Param({self.spec.name}={self.value!r})"


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _checked(name: str) -> str:
    if name in OWN_NAMES or not _NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} cannot name a loomrun parameter (expected letters, digits and _, at "
            f"most 64, not starting with a digit; {', '.join(sorted(OWN_NAMES))} are "
            "loomrun's own)"
        )
    return name


def _options(min, max, choices, doc, default) -> dict[str, Any]:
    return {"min": min, "max": max, "choices": tuple(choices), "doc": doc or "", "default": default}


def param(
    name: str,
    type: Any = float,
    *,
    default: Any = None,
    min: float | None = None,
    max: float | None = None,
    choices: tuple | list = (),
    doc: str = "",
) -> Param:
    """Declare a steerable parameter: `batch = loomrun.param("batch", int, default=64)`."""
    spec = spec_of(_checked(name), type, **_options(min, max, choices, doc, default))
    if spec.default is not None and spec.enum is None and not spec.structured:
        spec = P._replace(spec, default=P.check(spec, spec.default))
    declared = Param(spec)
    worker = _worker.current
    if worker is not None:
        worker.add_target(Target(spec, declared._get, declared._put))
    return declared


class _Handler:
    """A function or method called with the new value; a method is called on every instance."""

    def __init__(self, name: str | None, fn: Callable, options: dict[str, Any]):
        functools.update_wrapper(self, fn)
        self.fn = fn
        parameters = list(inspect.signature(fn).parameters.values())
        if not parameters:
            raise TypeError(f"handler {fn.__qualname__} must take the new value as its argument")
        value = parameters[-1]
        annotation = typing.get_type_hints(fn, include_extras=True).get(value.name)
        if annotation is None:
            raise TypeError(
                f"handler {fn.__qualname__}: annotate {value.name!r} with its type "
                "(float, int, bool, str, Literal[...], an Enum, a dataclass, a TypedDict, "
                "dict[str, T] or a list)"
            )
        if options["default"] is None and value.default is not inspect.Parameter.empty:
            options["default"] = value.default
        self.spec = spec_of(_checked(name or fn.__name__), annotation, **options)
        self.current = to_wire(self.spec.default) if self.spec.default is not None else None
        # A method, defined in a class body (`Model.set_dropout`, not `f.<locals>.g`): its
        # class is still being made when a restarted worker applies the desired value here,
        # and its instances come later still.
        scope = fn.__qualname__.rsplit(".", 2)
        self.method = len(scope) > 1 and scope[-2] != "<locals>" and parameters[0].name == "self"
        self.changed = False  # a change was applied: each new instance is given it
        self.instances: weakref.WeakSet = weakref.WeakSet()
        self.owner = ""
        worker = _worker.current
        if worker is not None:
            worker.add_target(Target(self.spec, lambda: self.current, self._put))

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __get__(self, obj, owner=None):
        return self if obj is None else types.MethodType(self.fn, obj)

    def __set_name__(self, owner: type, attr: str) -> None:
        self.owner = owner.__qualname__
        handlers = owner.__dict__.get("__loomrun_handlers__")
        if handlers is None:
            handlers = []
            _track_instances(owner, handlers)
        handlers.append(self)

    def _put(self, value: Any) -> None:
        converted = P.to_python(self.spec, value)
        if not self.method:
            self.fn(converted)
        for obj in list(self.instances):
            self.fn(obj, converted)
        self.current = value
        self.changed = True

    def give(self, obj: Any) -> None:
        """A new instance gets the value changed before it was made (a restarted worker's
        desired value, or a change sent before the script made its model)."""
        self.instances.add(obj)
        if not self.changed:
            return
        try:
            self.fn(obj, P.to_python(self.spec, self.current))
        except Exception as error:  # noqa: BLE001 - the script's own object is made anyway
            worker = _worker.current
            if worker is not None:
                worker.warn_once(f"{self.spec.name} handler raised {type(error).__name__}: {error}")


def _track_instances(owner: type, handlers: list[_Handler]) -> None:
    """Wrap the class's __init__ so each new instance is known to its handler methods."""
    original = owner.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for handler in handlers:
            handler.give(self)

    owner.__loomrun_handlers__ = handlers
    owner.__init__ = __init__


def handler(
    name: str | None = None,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple | list = (),
    doc: str | None = None,
):
    """Call the decorated function (or method) with the new value when `name` changes.

    The value's type comes from the annotation of the function's last parameter.
    """

    def decorate(fn: Callable) -> _Handler:
        return _Handler(name, fn, _options(min, max, choices, doc or fn.__doc__, None))

    return decorate


def step(**metrics: Any) -> None:
    """Mark a step boundary (for loops without a torch optimizer) and report metrics."""
    worker = _worker.current
    if worker is None:
        return
    if metrics:
        worker.metrics.report(metrics)
    worker.explicit_steps = True
    worker.boundary()


def report(**metrics: Any) -> None:
    """Report metrics (loss=..., acc=...) with the next status, without a step boundary."""
    worker = _worker.current
    if worker is not None:
        worker.metrics.report(metrics)


def track(*objects: Any) -> None:
    """Add to what a snapshot holds (and `rollback` puts back, `save` writes): a module
    no optimizer trains (an EMA copy), or any object with `state_dict()` and
    `load_state_dict()` (a sampler's position, a counter of the script's own). The modules
    the optimizers train, their optimizers, schedulers and GradScalers are found without it."""
    for obj in objects:
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(
                f"loomrun.track takes modules and objects with state_dict() and "
                f"load_state_dict(), not {type(obj).__name__}"
            )
    worker = _worker.current
    if worker is not None:
        worker.snapshots.finder.track(*objects)
