"""One replica's changes as its supervisor holds them, and the moves between their states.

A change comes off the broker (the relay takes it), is written to the mailbox (desired,
and unanswered), is answered by the worker (the pump reads it): applied, and then in
effect; agreed on by the ranks and waiting for its step (scheduled); missed or rejected,
and then not wanted any more; or replaced before the worker read it (superseded). A
restarted worker starts from what was in effect (the baseline). The relay and the pump
move changes only through the methods here; nothing else sets these fields."""

from __future__ import annotations

from collections import deque

from loomrun._proto import loomrun_pb2 as pb
from loomrun.desired import DesiredConfig, copy
from loomrun.outcomes import names_of, part_of
from loomrun.subjects import ACTIONS

SEEN_IDS = 32  # per parameter: enough to know a change seen again
TAKEN_KEPT = 512  # per replica: the changes taken lately, to go back to the one in effect
PENDING_KEPT = 256  # per replica: changes of several keys, waiting for the rest of them


class Written:
    """A change written to a replica's mailbox and not answered yet."""

    __slots__ = ("want", "replaced_at")

    def __init__(self, want: pb.DesiredParam):
        self.want = want
        self.replaced_at = 0  # the desired version that replaced it, once one did


def forget_taken(taken: dict[str, dict[str, pb.DesiredParam]], in_effect: set[str]) -> None:
    """Keep the TAKEN_KEPT latest changes taken, and every change in effect however old:
    a change that is not applied goes back to it, however many changes came since."""
    older = [change_id for change_id in taken if change_id not in in_effect]
    for change_id in older[: len(taken) - TAKEN_KEPT]:
        del taken[change_id]


class ReplicaChanges:
    """Written, answered, in effect, scheduled and the baseline of one replica's changes.

    Owned by the replica's ReplicaView; the relay calls the methods that take a change in
    and write it, the pump the ones that take an answer."""

    def __init__(self) -> None:
        self.desired = DesiredConfig()  # what the mailbox holds (the relay writes it there)
        self._written: dict[str, dict[str, Written]] = {}  # name -> id -> unanswered
        self._seen_ids: dict[str, deque] = {}  # name -> ids of changes written lately
        self._not_applied: deque[str] = deque(maxlen=256)  # ids: missed or rejected
        # id -> the change (name -> its entry), the latest taken
        self._taken: dict[str, dict[str, pb.DesiredParam]] = {}
        # A change of several keys comes key by key: id -> the keys of it come so far (one
        # that a key moved on from before the rest of it came is never written).
        self._pending: dict[str, dict[str, pb.DesiredParam]] = {}
        self._in_effect: dict[str, str] = {}  # name -> id of the change the worker applied
        self._scheduled: set[str] = set()  # ids the ranks agreed on, waiting for their step
        # name -> what a restarted worker starts from at once (see `rebase`), until that
        # worker answers for the name
        self._baseline: dict[str, pb.DesiredParam] = {}
        # action -> the id of the last one answered: the bucket keeps its key, and it comes
        # again after a reconnect, which must not do it again
        self._done: dict[str, str] = {}

    # -- what is known --------------------------------------------------------------

    def entry(self, name: str) -> pb.DesiredParam | None:
        return self.desired.entry(name)

    def waiting(self) -> bool:
        """Whether a change written is still unanswered (a `set` waits on it)."""
        return any(self._written.values())

    def in_effect(self, name: str) -> str | None:
        """The id of the change to `name` the worker applied, if any of ours."""
        return self._in_effect.get(name)

    def taken_count(self) -> int:
        return len(self._taken)

    def starts_from(self, name: str) -> pb.DesiredParam | None:
        """What a restarted worker starts from for `name`, until it answers for it."""
        return self._baseline.get(name)

    def taken_change(self, change_id: str, name: str) -> pb.DesiredParam | None:
        return self._taken.get(change_id, {}).get(name)

    # -- the relay: a change of several keys, assembled --------------------------------

    def delivered(self, name: str, change_id: str) -> list[dict[str, pb.DesiredParam]]:
        """A key's entry came off the broker (`change_id` "" for a deletion). Returns the
        changes of several keys waiting for the rest of them that this key moved on from:
        they can never be written whole (this key's latest is another change), and are
        superseded; so are the oldest past PENDING_KEPT (a client that gave up half-way)."""
        gone = [
            pending_id
            for pending_id, parts in self._pending.items()
            if pending_id != change_id and name in parts
        ]
        older = [pending_id for pending_id in self._pending if pending_id != change_id]
        gone += older[: max(0, len(self._pending) - PENDING_KEPT + 1)]
        for pending_id in dict.fromkeys(gone):
            self._not_applied.append(pending_id)
        return [self._pending.pop(pending_id) for pending_id in dict.fromkeys(gone)]

    def assemble(self, name: str, want: pb.DesiredParam) -> dict[str, pb.DesiredParam] | None:
        """One key of a change of several: the whole change (name -> entry) once every key
        of it has come and is each key's latest, else None (it waits for the rest). A
        change taken before (seen again after a reconnect) is given back as it came, one
        key: the desired state holds it already."""
        change_id = want.change_id
        if change_id in self._not_applied:
            return None  # one of its keys moved on before it came whole: answered so
        if change_id in self._taken or change_id in self._seen_ids.get(name, ()):
            return {name: want}
        parts = self._pending.setdefault(change_id, {})
        parts[name] = want
        if set(parts) != set(want.together):
            return None
        del self._pending[change_id]
        return parts

    # -- the relay: a change in ---------------------------------------------------------

    def want(self, name: str, want: pb.DesiredParam) -> tuple[int, bool]:
        """Take a change off the broker into the desired state: (the new desired version,
        or 0 when nothing changed; whether it was written before, and so answered)."""
        if want.change_id in self._not_applied or self._done.get(name) == want.change_id:
            return 0, True  # applied nowhere, or an action done: not for a restarted worker
        again = want.change_id in self._seen_ids.get(name, ())
        base = self._baseline.get(name)  # a restarted worker may not have applied it yet
        if base is not None and base.change_id != want.change_id:
            want.base.CopyFrom(base)
        return self.desired.take(name, want), again

    def unwant(self, name: str) -> int:
        """The change to `name` deleted on the broker: the desired version without it, or 0."""
        version = self.desired.drop(name)
        if version:
            self._replaced(name, version)
        return version

    def not_written(self, name: str) -> None:
        """The mailbox refused the write: the desired state as it was."""
        self.desired.restore(name)

    def written(self, name: str, change_id: str, version: int, again: bool) -> None:
        """The change is in the mailbox: unanswered (unless answered before), and the
        changes it replaced are marked so."""
        self._replaced(name, version)
        self._taken.setdefault(change_id, {})[name] = copy(self.desired.entry(name))
        if len(self._taken) > TAKEN_KEPT:
            forget_taken(self._taken, set(self._in_effect.values()))
        if not again:
            self._seen_ids.setdefault(name, deque(maxlen=SEEN_IDS)).append(change_id)
            unanswered = Written(copy(self.desired.entry(name)))
            self._written.setdefault(name, {})[change_id] = unanswered

    def _replaced(self, name: str, version: int) -> None:
        for earlier in self._written.get(name, {}).values():
            earlier.replaced_at = earlier.replaced_at or version

    def not_applied(self, outcome: pb.Outcome) -> bool:
        """A change applied nowhere (missed, rejected: the user was told so; or superseded,
        which for a change of several keys may leave the others of it desired): what the
        replica wants goes back to what is in effect there (not merely to the entry before
        it, which may never have been applied), so a restarted worker does not start from
        it either. True when the desired state changed (to be written)."""
        if outcome.state != pb.SUPERSEDED or outcome.parts:  # (a single one is never latest)
            self._not_applied.append(outcome.change_id)
        changed = False
        for name in names_of(outcome):
            held = self.desired.entry(name)
            if held is None or held.change_id != outcome.change_id:
                continue  # a newer change stands already
            self._written.get(name, {}).pop(outcome.change_id, None)
            in_effect = self.taken_change(self._in_effect.get(name, ""), name)
            if in_effect is not None:
                self.desired.take(name, in_effect)
            else:
                self.desired.drop(name)  # nothing of ours applied: the worker keeps its own
            changed = True
        return changed

    def rebase(self) -> None:
        """The replica restarts: it starts from what was in effect at once, and what was
        waiting still waits (see DesiredConfig.rebase)."""
        settled = set(self._in_effect.values()) | self._scheduled
        found = {name: self.taken_change(cid, name) for name, cid in self._in_effect.items()}
        in_effect = {name: want for name, want in found.items() if want is not None}
        # What the new worker starts from, per name: a change that comes before the worker
        # answered for the name takes it as its base (neither is lost meanwhile).
        self._baseline = self.desired.rebase(settled, in_effect)

    # -- the pump: answers in ---------------------------------------------------------

    def answered(self, outcome: pb.Outcome, replayed: bool) -> None:
        """The worker's answer to a change (`replayed`: one of --replay's, not ours)."""
        # Of the desired state, as the worker counts it: an answer "overridden" at once
        # is of a change the worker took too (it will not apply it again).
        taken = outcome.state == pb.APPLIED or (
            outcome.state == pb.OVERRIDDEN and not outcome.ended
        )
        for name in names_of(outcome):
            self._written.get(name, {}).pop(outcome.change_id, None)
            held = self.taken_change(outcome.change_id, name)
            if taken and held is not None and held.kind in (pb.SCALE, pb.SHIFT):
                self._worked_out(name, outcome)
            if name in ACTIONS and not replayed:  # never in effect; done (or not) for good
                self._done[name] = outcome.change_id
            elif taken and not replayed:
                self._in_effect[name] = outcome.change_id
            if outcome.state != pb.SUPERSEDED:  # the worker took up the name: no base now
                self._baseline.pop(name, None)

    def _worked_out(self, name: str, outcome: pb.Outcome) -> None:
        """Arithmetic on the value in effect (a rule's lr*0.5), applied: held from now on
        as the value it came to, which a restarted worker starts from (not the factor,
        which would apply again to whatever it starts with)."""
        part = part_of(outcome, name) if outcome.parts else outcome
        if not part.new.WhichOneof("kind"):
            return
        for entry in (self.taken_change(outcome.change_id, name), self.desired.entry(name)):
            if entry is not None and entry.change_id == outcome.change_id:
                entry.kind = pb.SET
                entry.value.CopyFrom(part.new)

    def acks_read(self, scheduled: set[str], read_version: int) -> list[dict[str, pb.DesiredParam]]:
        """The worker's acks were read: the changes its ranks agreed on and that wait for
        their step (`scheduled`), and the desired version it read. Returns, removed, the
        changes (name -> entry) replaced before the worker ever read them, whole: one
        key of a change of several replaced is enough. They are superseded."""
        self._scheduled = set(scheduled)
        gone_ids = [
            change_id
            for changes in self._written.values()
            for change_id, written in changes.items()
            if change_id not in self._scheduled
            and written.replaced_at
            and written.replaced_at <= read_version
        ]
        gone = []
        for change_id in dict.fromkeys(gone_ids):
            parts = {
                name: changes.pop(change_id).want
                for name, changes in self._written.items()
                if change_id in changes
            }
            gone.append(parts)
        return gone
