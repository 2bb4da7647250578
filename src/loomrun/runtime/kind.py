"""The built-in `optimizer`: which of torch's kinds a worker's optimizers step as, switched
in place (runtime.switch) by a change, and back to the script's own kind by `unset`."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from loomrun import builtin_params as BP
from loomrun import params as P
from loomrun.runtime.keep import _plain
from loomrun.runtime.switch import check, hyperparameters, installed, kind_of, switch
from loomrun.runtime.target import Target

if TYPE_CHECKING:
    from loomrun.runtime.optim import Optimizers


class OptimizerKind:
    """Owned by the worker's Optimizers: the `optimizer` target, and what each switch did."""

    def __init__(self, optimizers: Optimizers):
        self.optimizers = optimizers
        # Each optimizer's own kind and hyperparameters, as the script made it, kept once
        # it is switched to another: `unset optimizer` goes back to them.
        self._own_kinds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._switched: list = []  # what the last switch did (runtime.switch.Switched)

    def switchable(self) -> list:
        """The optimizers a switch changes: every one, when each is exactly one of
        torch.optim's kinds and none is the inner copy of another (ZeroRedundancyOptimizer's
        inner optimizer is not switched alone); else none."""
        found = self.optimizers.optimizers
        whole = all(self.optimizers.is_outer(g) for o in found for g in o.param_groups)
        if not found or not whole or any(kind_of(o) is None for o in found):
            return []
        return found

    def target(self) -> Target | None:
        """The built-in, once the script steps with torch.optim optimizers (and the kinds
        dispatch: LOOMRUN_OPTIMIZER_SWITCH)."""
        if not installed() or not self.switchable():
            return None
        return Target(
            BP.optimizer_spec(self.own_kind()),
            self.kind,
            self.switch,
            unset=lambda: self.switch(None),
            own=lambda: self.own_kind() if self.kind() != self.own_kind() else None,
            reshapes=self.reshapes,
            note=self.note,
        )

    def note(self) -> str:
        """What the last switch did, as it stands now: a key loomrun steers (given in the
        same change, or held before) is not said to be at the new kind's default."""
        steered = {name for name in BP.BUILTINS if self.optimizers.own(name) is not None}
        return "; ".join(dict.fromkeys(s.sentence(steered) for s in self._switched))

    def kind(self) -> str | None:
        """The kind the optimizers step as now (the first one's)."""
        found = self.switchable()
        return kind_of(found[0]) if found else None

    def own_kind(self) -> str | None:
        """The kind the script made its (first) optimizer as."""
        found = self.switchable()
        if not found:
            return None
        return self._own_kinds[found[0]][0] if found[0] in self._own_kinds else self.kind()

    def reshapes(self, kind: str | None) -> tuple[set[str], set[str]]:
        """The built-ins that appear, and those that go, with a switch to `kind`."""
        if kind not in BP.OPTIMIZER_BUILTINS:
            raise P.ParamError(f"no optimizer kind {kind!r}")
        now = {name for name in BP.BUILTINS if name in self.optimizers.worker.targets}
        then = BP.OPTIMIZER_BUILTINS[kind]
        return then - now, now - then

    def switch(self, kind: str | None) -> None:
        """Every optimizer to `kind` in place (None: each back to the script's own kind and
        hyperparameters); a built-in that a new kind lacks goes back to the script first,
        and the schema then lists the new kind's."""
        optimizers, worker = self.optimizers, self.optimizers.worker
        found = self.switchable()
        if not found:
            raise P.ParamError("this replica's optimizers cannot be switched")
        for optimizer in found:
            if optimizer not in self._own_kinds:
                self._own_kinds[optimizer] = (kind_of(optimizer), self._own_values(optimizer))
        wanted = {o: kind or self._own_kinds[o][0] for o in found}
        for optimizer in found:  # before anything changes: all of them, or none
            try:
                check(optimizer, wanted[optimizer], self._schedulers_of(optimizer))
            except ValueError as error:
                raise P.ParamError(str(error)) from None
        having = set.intersection(*(BP.OPTIMIZER_BUILTINS[k] for k in wanted.values()))
        lacking = set(BP.BUILTINS) - having
        ended = {n: optimizers.own(n) for n in lacking if optimizers.own(n) is not None}
        for name in lacking:
            optimizers.unset(name)  # given back to the script, while its key is there
        if ended:  # a change in effect there ends with its own record
            why = f"the switch to {wanted[found[0]]} took it away"
            worker.stepped(set(), ended, dict.fromkeys(ended, why))
        self._switched = []
        for optimizer in found:
            own_kind, own_values = self._own_kinds[optimizer]
            values = own_values if wanted[optimizer] == own_kind else None
            schedulers = self._schedulers_of(optimizer)
            self._switched.append(switch(optimizer, wanted[optimizer], values, schedulers))
        for name in [n for n in worker.targets if n in BP.BUILTINS and not optimizers.has(n)]:
            del worker.targets[name]
        optimizers.publish_targets()
        worker.write_schema()

    def _own_values(self, optimizer) -> list[dict]:
        """Each group's hyperparameters as the script has them: what loomrun steers there,
        the script's own value."""
        values = hyperparameters(optimizer)
        for group, found in zip(optimizer.param_groups, values, strict=True):
            for key in found:
                kept = self.optimizers.steered.kept_at(group, key)
                if kept is not None:
                    kept.refresh()
                    found[key] = _plain(kept.own)
        return values

    def _schedulers_of(self, optimizer) -> list:
        schedulers = list(self.optimizers.schedulers)
        return [s for s in schedulers if getattr(s, "optimizer", None) is optimizer]
