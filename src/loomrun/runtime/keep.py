"""Keeping a steered value in effect in a param group, whoever else writes it.

The script (its own `g['lr'] = get_lr(it)`, a scheduler, a wrapper's scheduler, the
Trainer) only ever sees its own value: loomrun puts the value in effect into the group
just before the optimizer's step runs and gives the script's value back right after.
So an absolute writer (nanoGPT, LambdaLR, OneCycleLR) and a relative one (`g['lr'] *=
gamma`, chainable schedulers) both keep computing their own schedule, and the step runs
with that schedule times new/old (or the held value): never scaled twice, never
compounding.

What the script wrote is told apart from what loomrun stored by identity: the value
loomrun stores is an object of its own, so a write of an equal value is still a write.
A value found replaced right after the step was written by the step itself (an optimizer
that sets lr from its own state): loomrun cannot keep it, and says so ("overridden").
"""

from __future__ import annotations

from typing import Any


class Scale:
    """lr as the script's schedule times a factor, above an absolute floor it set."""

    __slots__ = ("factor", "floor")

    def __init__(self, factor: float, floor: float = 0.0):
        self.factor, self.floor = factor, floor

    def __call__(self, own: Any, first: Kept | None) -> Any:
        return max(own * self.factor, self.floor) if own else own  # 0 stays 0


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
        base = first.own_now() if first is not None else 0.0
        return own * self.value / base if base else self.value


class Kept:
    """One key of one param group that loomrun steers: the script's own value, the object
    stored for the step, and the rules by name (`lr`, `lr.1`): the newest one wins."""

    __slots__ = ("group", "key", "own", "put", "rules", "first", "tensor")

    def __init__(self, group: dict, key: str, first: Kept | None = None):
        self.group, self.key, self.first = group, key, first
        self.own: Any = None
        self.put: Any = None  # what loomrun stored for the step running now, or None
        self.rules: dict[str, Any] = {}
        self.tensor = hasattr(group[key], "fill_")  # a capturable optimizer's tensor lr

    def rule(self, name: str, rule) -> None:
        self.rules.pop(name, None)
        self.rules[name] = rule

    @property
    def active(self) -> tuple[str, Any]:
        return next(reversed(self.rules.items()))

    def own_now(self) -> Any:
        """The script's own value: in the group between steps, kept aside during one."""
        if self.put is not None:
            return self.own
        return _plain(self.group[self.key])

    def effective(self) -> Any:
        """The value a step runs with now (with no rule: the script's)."""
        if self.put is not None:
            return _plain(self.put)
        own = self.own_now()
        return self.active[1](own, self.first) if self.rules else own

    def before(self) -> None:
        """Right before the optimizer's step: the value in effect goes in."""
        group, key = self.group, self.key
        if self.tensor:
            if self.put is None:
                self.own = group[key].item()
            group[key].fill_(self.active[1](self.own, self.first))
            self.put = group[key].item()  # as the tensor holds it (a float32 rounds)
            return
        current = group[key]
        if current is not self.put:  # the script's (or its schedule's) value for this step
            self.own = current
        self.put = value = self.active[1](self.own, self.first)
        group[key] = value

    def after(self) -> Any:
        """Right after the step: the script's value back. Returns what replaced loomrun's
        value during the step (it was not in effect), or None."""
        put = self.put
        if put is None:
            return None  # given back already (an optimizer whose step calls its parent's)
        self.put = None
        group, key = self.group, self.key
        if self.tensor:
            found = group[key].item()
            if found != put:
                self.own = found
                return found
            group[key].fill_(self.own)
            return None
        found = group[key]
        if found is not put:
            self.own = found
            return found
        group[key] = self.own
        return None

    def drop(self, name: str) -> None:
        """Without the rule of `name`; with no rule left, the script's value is in place."""
        self.rules.pop(name, None)


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and hasattr(value, "numel") and value.numel() == 1:
        return value.item()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
