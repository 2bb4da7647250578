"""Where a parameter's value goes: a declared param, a handler, or an optimizer key."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb


class Target:
    """A parameter's spec, and how to read and change its live value.

    `kept` targets are values an optimizer steps with (lr, momentum, ...): loomrun keeps
    them in effect step after step, takes `hold`, and answers a change to them after the
    step it ran in, when it is known whether the value held. `own` reads the script's own
    value of a steered one (None when loomrun does not steer it). `reshapes(value)` says
    which parameters appear and which go with a value (the optimizer's kind brings its own
    hyperparameters); `note()`, what applying the last value did, for its answer (the
    worker asks it once the whole change is applied);
    `precheck(value, hold)` raises ParamError when `put` would refuse the value now (asked
    before any part of a change is applied)."""

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
        reshapes: Callable[[Any], tuple[set[str], set[str]]] | None = None,
        note: Callable[[], str] | None = None,
        precheck: Callable[..., Any] | None = None,
    ):
        self.spec = spec
        self.get = get
        self.put = put
        self._unset = unset
        self.own = own or _nothing
        self.held = held or _never
        self.kept = kept
        self._before: tuple = (None, False, False)
        self.reshapes = reshapes
        self.note = note
        self.precheck = precheck

    def apply(self, want: pb.DesiredParam, outcome: pb.Outcome) -> bool:
        """Put the change `want` into effect, and say so in `outcome` (old, new, reason);
        False (the reason said) when the value is refused or the handler raised."""
        name = self.spec.name
        try:
            old = self.get()
            self._before = (old, self.own() is not None, self.held())  # for `restore`
            if want.kind == pb.UNSET:
                self.unset()
                with contextlib.suppress(TypeError, ValueError, P.ParamError):
                    outcome.new.CopyFrom(P.to_pb(self.get()))
            else:
                value = P.check(self.spec, P.from_pb(want.value))
                if self.kept:
                    self.put(value, want.kind == pb.HOLD)
                else:
                    self.put(value)
        except P.ParamError as error:
            outcome.reason = str(error)
            return False
        except Exception as error:  # noqa: BLE001 - a handler's failure is a rejection
            outcome.reason = f"{name} handler raised {type(error).__name__}: {error}"
            return False
        if old is not None:
            with contextlib.suppress(TypeError, ValueError):  # one the wire cannot carry
                outcome.old.CopyFrom(P.to_pb(old))
        outcome.state = pb.APPLIED
        if self.kept and want.kind != pb.UNSET and isinstance(value, float):
            now = self.get()
            if isinstance(now, float) and not math.isclose(now, value, rel_tol=1e-9):
                # `new` stays what was asked (a replay asks it again); the reason says
                # what is in effect meanwhile.
                outcome.reason = (
                    f"in effect: {P.format_value(now)}, not {P.format_value(value)}: the "
                    "floor its scheduler was given (eta_min, min_lrs), while the schedule "
                    "times new/old is below it"
                )
        return True

    def restore(self) -> str:
        """Back to where the last `apply` found this target (another part of the same
        change was refused after it ran): a handler runs again with its earlier value; an
        optimizer's value is steered (or held) as it was, or given back to the script.
        Returns why it could not be, or ""."""
        old, steered, held = self._before
        try:
            if self.kept and not steered:
                self.unset()
            elif old is None:
                return f"{self.spec.name} had no value to go back to"
            elif self.kept:
                self.put(old, held)
            else:
                self.put(old)
        except Exception as error:  # noqa: BLE001 - said in the change's answer
            return f"{self.spec.name} could not be put back ({type(error).__name__}: {error})"
        return ""

    def show(self, status: pb.Status, largest: int) -> None:
        """This target's value into a status (and the script's own, when steered); one
        that cannot be read, or is over `largest` bytes, is left out."""
        name = self.spec.name
        try:
            value = self.get()
            if value is not None:
                wire = P.to_pb(value)
                if wire.ByteSize() <= largest:
                    status.values[name].CopyFrom(wire)
            if (own := self.own()) is not None:
                status.own[name].CopyFrom(P.to_pb(own))
                if self.held():
                    status.held.append(name)
        except Exception:  # noqa: BLE001 - a value we cannot read is left out
            return

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
