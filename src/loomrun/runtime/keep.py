"""Keeping a steered value in effect in a param group, whoever else writes it.

The group holds the value in effect, so whatever reads it (the script's own print, a
checkpoint, Lightning's LearningRateMonitor) sees what the steps run with. loomrun keeps
the script's own value beside it, and tells every write apart:

- loomrun's own value is an object of its own (`InEffect`), so a write is known by
  identity: a schedule landing on the steered value is still a write;
- an absolute write (nanoGPT's `g['lr'] = get_lr(it)`) is the script's new own value;
- a relative write (`g['lr'] *= gamma`) is arithmetic on the `InEffect` the group held,
  which carries the script's own value through the same arithmetic: the new own value is
  own * gamma, never the steered value times gamma (that would compound);
- a torch LR scheduler's step (on the optimizer, or on any wrapper sharing its groups)
  runs with the script's own values in the groups (see `Kept.expose`), so chainable and
  closed-form schedulers alike compute the script's own schedule.

The value in effect is a rule of the script's own value (lr: the schedule times new/old;
or held), put into the group again before each step. A value found replaced right after a
step was written by the step itself: loomrun cannot keep it there, and says so.
"""

from __future__ import annotations

import operator
from typing import Any


class InEffect(float):
    """A steered float as loomrun puts it in a group: equal to the value in effect, it
    carries the script's own value, and arithmetic on it carries that along (a relative
    write stays relative to the script's value). It pickles as a plain float."""

    __slots__ = ("own",)
    __array_ufunc__ = None  # numpy defers to the reflected methods below: own carried too

    def __new__(cls, value: float, own: float):
        made = super().__new__(cls, value)
        made.own = own
        return made

    def __reduce__(self):
        return (float, (float(self),))

    def __getnewargs__(self):
        return (float(self),)


def _carried(op, swapped: bool = False):
    def method(self, other):
        if not isinstance(other, int | float):
            return NotImplemented
        mine = float(self)
        theirs = float(other)
        own_theirs = other.own if isinstance(other, InEffect) else theirs
        if swapped:
            return InEffect(op(theirs, mine), op(own_theirs, self.own))
        return InEffect(op(mine, theirs), op(self.own, own_theirs))

    return method


for _name, _op in (
    ("mul", operator.mul),
    ("truediv", operator.truediv),
    ("add", operator.add),
    ("sub", operator.sub),
    ("pow", operator.pow),
    ("floordiv", operator.floordiv),
    ("mod", operator.mod),
):
    setattr(InEffect, f"__{_name}__", _carried(_op))
    setattr(InEffect, f"__r{_name}__", _carried(_op, swapped=True))


def _round(self, digits=None):
    if digits is None:
        return round(float(self))
    return InEffect(round(float(self), digits), round(self.own, digits))


InEffect.__round__ = _round


class Scale:
    """lr as the script's schedule times new/old, above an absolute floor it set.

    Exactly `new` while the schedule stands at `old`: `0.1 * (0.0555 / 0.1)` is
    0.055499999999999994, and a user who asked for 0.0555 must see 0.0555."""

    __slots__ = ("new", "old", "floor")

    def __init__(self, new: float, old: float, floor: float = 0.0):
        self.new, self.old, self.floor = new, old, floor

    def __call__(self, own: Any, first: Kept | None) -> Any:
        if not own:
            return own  # a schedule at 0 stays 0
        scaled = self.new if own == self.old else own * self.new / self.old
        return max(scaled, self.floor)


class Hold:
    """Exactly this value, whatever the script says."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __call__(self, own: Any, first: Kept | None) -> Any:
        return self.value


class HoldRatio:
    """Another group while `lr` is held: its ratio to the first group, as the script's
    schedule has it now, times the held value."""

    __slots__ = ("value",)

    def __init__(self, value: float):
        self.value = value

    def __call__(self, own: Any, first: Kept | None) -> Any:
        base = first.own if first is not None else 0.0
        return own * self.value / base if base else self.value


def _own_of(found: Any) -> Any:
    """The script's value in what a group holds: an InEffect's own, or the value itself."""
    return found.own if type(found) is InEffect else found


class Kept:
    """One key of one param group that loomrun steers: the script's own value, the object
    in the group now, and the rules by name (`lr`, `lr.1`): the newest one wins."""

    __slots__ = ("group", "key", "own", "put", "plain", "rules", "first", "swapped", "basis")

    def __init__(self, group: dict, key: str, first: Kept | None = None):
        self.group, self.key, self.first = group, key, first
        found = group[key]
        self.own: Any = _plain(found) if _is_tensor(found) else _own_of(found)
        self.put: Any = None  # what loomrun stored in the group, or None
        # The same value as a plain float, in the group while a step runs: the optimizer's
        # arithmetic on lr stays a float's (and torch.compile sees a float).
        self.plain: Any = None
        self.rules: dict[str, Any] = {}
        self.swapped = False  # a tensor lr during a step (filled in place, given back after)
        self.basis: Any = None  # the first group's own value the value in effect was made from

    def rule(self, name: str, rule) -> None:
        self.rules.pop(name, None)
        self.rules[name] = rule

    @property
    def active(self) -> tuple[str, Any]:
        return next(reversed(self.rules.items()))

    def effective(self) -> Any:
        """The value the next step runs with (with no rule: the script's)."""
        return self.active[1](self.own, self.first) if self.rules else self.own

    def settle(self, again: bool = False, stepping: bool = False) -> None:
        """Take what the group holds as the script's own value (unless it is loomrun's),
        and put the value in effect there. `again`: recompute it all the same. A tensor
        value is filled only for the step (`stepping`)."""
        group, key = self.group, self.key
        found = group[key]
        if _is_tensor(found):
            if stepping:
                self._fill()
            return
        if found is self.put and not again:
            return
        if not self._mine(found):
            self.own = _own_of(found)
        value = self.effective()
        if isinstance(value, float):
            self.put, self.plain = InEffect(value, self.own), float(value)
        else:
            self.put = self.plain = value
        self.basis = self.first.own if self.first is not None else None
        group[key] = self.put

    def refresh(self) -> None:
        """What the script wrote since the last step is its own value (before a change is
        computed from it, or a value is read)."""
        found = self.group[self.key]
        if not self._mine(found) and not _is_tensor(found):
            self.own = _own_of(found)

    def before(self) -> None:
        """Right before a step (the hot path): nothing to do unless the script wrote the
        group, or the first group's own value this one follows moved."""
        if self.group[self.key] is self.put and (
            self.first is None or self.first.own is self.basis
        ):
            return
        self.settle(again=True, stepping=True)

    def expose(self) -> None:
        """The script's own value in the group, while a scheduler computes from it."""
        found = self.group[self.key]
        if _is_tensor(found):
            return
        if not self._mine(found):
            self.own = _own_of(found)
        self.put = self.plain = None
        self.group[self.key] = self.own

    def _mine(self, found: Any) -> bool:
        """loomrun's own value: as kept between steps, or the plain float of a step (left
        there when the step raised)."""
        return self.put is not None and (found is self.put or found is self.plain)

    def after(self) -> Any:
        """Right after the step: what replaced loomrun's value during the step (it was
        not in effect), or None."""
        found = self.group[self.key]
        if found is self.plain and self.put is not None:
            self.group[self.key] = self.put  # the step ran with it; back to loomrun's own
            return None
        if found is self.put:
            return None
        if self.swapped:  # a tensor: the script's own value back
            self.swapped = False
            if found.item() != self.put:
                self.own = found.item()
                return self.own
            found.fill_(self.own)
            return None
        if self.put is None:
            return None
        self.own = _own_of(found)
        return self.own

    def give_back(self) -> None:
        """No rule left: the script's own value in the group again."""
        found = self.group[self.key]
        if _is_tensor(found):
            if self.swapped:
                found.fill_(self.own)
                self.swapped = False
        elif found is self.put or (found is self.plain and self.put is not None):
            self.group[self.key] = self.own
        elif type(found) is InEffect:
            self.group[self.key] = found.own
        self.put = self.plain = None

    def drop(self, name: str) -> None:
        self.rules.pop(name, None)

    def _fill(self) -> None:
        """A tensor lr (capturable optimizers) is filled in place: the script's value is
        read before the step and given back after it."""
        found = self.group[self.key]
        if not self.swapped:
            self.own = found.item()
        found.fill_(self.effective())
        self.put = found.item()  # as the tensor holds it (a float32 rounds)
        self.swapped = True


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "fill_")


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and hasattr(value, "numel") and value.numel() == 1:
        return value.item()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if type(value) is InEffect:
        return float(value)
    return value
