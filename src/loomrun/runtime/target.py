"""Where a parameter's value goes: a declared param, a handler, or an optimizer key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loomrun import params as P


class Target:
    """A parameter's spec, and how to read and change its live value.

    `kept` targets are values an optimizer steps with (lr, momentum, ...): loomrun keeps
    them in effect step after step, takes `hold`, and answers a change to them after the
    step it ran in, when it is known whether the value held. `own` reads the script's own
    value of a steered one (None when loomrun does not steer it)."""

    def __init__(
        self,
        spec: P.ParamSpec,
        get: Callable[[], Any],
        put: Callable[..., None],
        *,
        unset: Callable[[], None] | None = None,
        own: Callable[[], Any] | None = None,
        held: Callable[[], bool] | None = None,
        kept: bool = False,
    ):
        self.spec = spec
        self.get = get
        self.put = put
        self._unset = unset
        self.own = own or _nothing
        self.held = held or _never
        self.kept = kept

    def unset(self) -> None:
        """Back to the script: its own value (a declared parameter's default)."""
        if self._unset is not None:
            self._unset()
            return
        if self.spec.default is None:
            raise P.ParamError(f"{self.spec.name} has no value of the script's own to go back to")
        self.put(self.spec.default)


def _nothing() -> None:
    return None


def _never() -> bool:
    return False
