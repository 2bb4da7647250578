"""Every answer a worker gives, once, in order: the acks its supervisor reads.

An answer names its change by id. A change to a value an optimizer steps with is parked
when applied and answered after the step that ran with it: applied, or overridden when
the step itself wrote over it; a change in effect that a later step writes over gets a
second record, overridden and `ended`."""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb
from loomrun.outcomes import answer, names_of

RECENT_OUTCOMES = 512


class AnswerBook:
    """Owned by the Worker: what it answered and applied per name, the answers parked until
    a step ran with them, and the recent answers the acks carry."""

    def __init__(self, warn):
        self.warn = warn
        # Called with (name, new value, the step it took effect at) of each applied change,
        # once it is answered (LoomCallback logs them).
        self.listeners: list = []
        self._answered: dict[str, str] = {}  # name -> id of the change last answered
        self._in_effect: dict[str, str] = {}  # name -> id of the change last applied
        self._in_effect_want: dict[str, pb.DesiredParam] = {}  # name -> that change
        # Changes to values an optimizer steps with, applied at this boundary: answered
        # after the step, applied or overridden (written over by the step itself).
        self._parked: dict[str, pb.Outcome] = {}
        self._recent: deque[pb.Outcome] = deque(maxlen=RECENT_OUTCOMES)
        self._seq = 0

    def settled(self, name: str, change_id: str) -> bool:
        """This change to `name` was answered, or is the one in effect."""
        return change_id in (self._answered.get(name), self._in_effect.get(name))

    def fresh(self, name: str) -> bool:
        """Nothing was answered for `name` yet (a restarted worker starts from its base)."""
        return name not in self._answered and name not in self._in_effect

    def parked(self) -> set[str]:
        """The names whose answers wait for a step to run with them."""
        return set(self._parked)

    def give(self, outcome: pb.Outcome, quiet: bool = False, replayed: bool = False) -> None:
        """The answer to a change (see Worker._answer); a parked one goes out later."""
        for name in names_of(outcome):
            if not quiet and not replayed:
                self._answered[name] = outcome.change_id
            if outcome.state == pb.APPLIED and not replayed:
                self._in_effect[name] = outcome.change_id
        if not self._is_parked(outcome):
            self.publish(outcome)

    def _is_parked(self, outcome: pb.Outcome) -> bool:
        return any(parked is outcome for parked in self._parked.values())

    def took(self, name: str, want: pb.DesiredParam) -> None:
        """`want` was applied to `name`: what a later step that writes over it ends."""
        self._in_effect_want[name] = want

    def park(self, names: list[str], outcome: pb.Outcome) -> None:
        """Answer `outcome` once a step ran with each of `names` (the values of the change
        that an optimizer steps with); one parked before for one of them (a newer change
        before any step ran) goes out as it stands."""
        for name in names:
            earlier = self._parked.pop(name, None)
            if earlier is not None and earlier is not outcome:
                for other in [n for n, o in self._parked.items() if o is earlier]:
                    del self._parked[other]
                self.publish(earlier)
            self._parked[name] = outcome

    def stepped(
        self, done: set[str], replaced: dict[str, Any], why: dict[str, str] | None, step: int
    ) -> bool:
        """After an optimizer's step: the parked changes it was the last to run with
        (`done`) are answered, applied or overridden; a change in effect that the step
        wrote over (`replaced`: name -> the value found) has ended. `why` says what ended
        a change, when not the step. True when anything was answered."""
        if not (self._parked and done) and not replaced:
            return False
        for name in [n for n in self._parked if n in done or n in replaced]:
            outcome = self._parked.pop(name)
            if name in replaced:
                found = P.format_value(replaced.pop(name))
                said = (why or {}).get(name) or (
                    f"the optimizer's own step {outcome.step} wrote {name}={found} over it"
                )
                for part in outcome.parts:
                    part.overridden = part.overridden or part.name == name
                outcome.reason = (
                    f"{outcome.reason}; {said}"
                    if outcome.state == pb.OVERRIDDEN
                    else f"{said}: loomrun cannot keep it in effect here"
                )
                outcome.state = pb.OVERRIDDEN
            if not self._is_parked(outcome):  # every value of the change has stepped
                self.publish(outcome)
        for name, value in replaced.items():
            want = self._in_effect_want.get(name, pb.DesiredParam())
            ended = answer(want, name, pb.OVERRIDDEN, step)
            ended.ended = True
            ended.reason = (why or {}).get(name) or (
                f"the optimizer's own step {step} wrote {name}="
                f"{P.format_value(value)} over it: no longer in effect"
            )
            ended.new.Clear()
            with contextlib.suppress(TypeError, ValueError, P.ParamError):
                ended.new.CopyFrom(P.to_pb(value))
            ended.old.CopyFrom(want.value)
            self.publish(ended)
        return True

    def publish(self, outcome: pb.Outcome) -> None:
        """An answer goes out: to the listeners when applied, then to the acks."""
        parts = list(outcome.parts) or [outcome]
        if outcome.state == pb.APPLIED:
            for listener in self.listeners:
                for part in parts:
                    try:
                        listener(part.name, P.from_pb(part.new), outcome.step)
                    except Exception as error:  # noqa: BLE001 - a listener never breaks a step
                        self.warn(f"a listener of applied changes failed: {error!r}")
        for part in {id(p): p for p in [outcome, *parts]}.values():
            for value in (part.old, part.new):
                if value.ByteSize() > P.LARGEST_VALUE:  # a value read from the script, unchecked
                    value.Clear()
        self._seq += 1
        outcome.seq = self._seq
        self._recent.append(outcome)

    def acks(self, read: int, read_version: int, waiting: list[pb.DesiredParam], capacity: int):
        """The acks to write: the answers the supervisor has not read (it read up to
        `read`), the desired version read, and the changes held unanswered (agreed on and
        waiting for their step, or parked): the supervisor must not take them for replaced
        before the worker read them."""
        while self._recent and self._recent[0].seq <= read:  # the supervisor has those
            self._recent.popleft()
        held = [w.change_id for w in waiting] + [o.change_id for o in self._parked.values()]
        acks = pb.Acks(recent=self._recent, read_version=read_version, scheduled=held)
        while acks.ByteSize() > capacity and len(acks.recent) > 1:
            del acks.recent[: len(acks.recent) // 4 or 1]  # the oldest were read long ago
        return acks
