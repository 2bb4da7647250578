"""The desired state of one replica, as the supervisor keeps it and writes it to the mailbox.

Level-triggered: the whole state is written every time, so a worker that missed a write,
or restarted, still converges on the latest state. A change is known by the id its client
gave it, never by a key-value revision: revisions start again when a broker's store is
made anew, ids do not repeat. The version here is the supervisor's own counter.
"""

from __future__ import annotations

import secrets
from typing import Any

from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb
from loomrun.subjects import ACTIONS, PAUSE

MOST_TOGETHER = 64  # parameters in one change, at most


def new_change_id() -> str:
    return secrets.token_hex(8)


def change(
    value: Any,
    at_step: int = 0,
    at_once: bool = False,
    origin: str = "",
    change_id: str = "",
    kind: int = pb.SET,
    together: list[str] | None = None,
) -> pb.DesiredParam:
    """A desired change, as a client writes it; a fresh id unless given. One `set` gives
    the same id to every parameter and every replica it changes: it is one change, and
    ranks agree on a change by its id; `together` names every parameter of a `set` of
    several. An unset carries no value: the worker knows the script's."""
    want = pb.DesiredParam(
        at_step=at_step,
        change_id=change_id or new_change_id(),
        at_once=at_once,
        origin=origin,
        kind=kind,
        together=sorted(together) if together and len(together) > 1 else [],
    )
    if kind != pb.UNSET:
        want.value.CopyFrom(P.to_pb(value))
    return want


def copy(want: pb.DesiredParam) -> pb.DesiredParam:
    """A copy that a later change of the held entry leaves as it is."""
    kept = pb.DesiredParam()
    kept.CopyFrom(want)
    return kept


def base_of(in_effect: pb.DesiredParam) -> pb.DesiredParam:
    """The change in effect as the base of a newer one: applied at once, at no step, on
    its own (each parameter of a change of several has its own base)."""
    base = copy(in_effect)
    base.ClearField("base")
    base.ClearField("together")
    base.at_step, base.at_once = 0, True
    return base


class DesiredConfig:
    """Parameter values and the paused flag wanted for one replica."""

    def __init__(self) -> None:
        self.state = pb.DesiredState()
        self._previous: dict[str, pb.DesiredParam | None] = {}

    def entry(self, name: str) -> pb.DesiredParam | None:
        if name == PAUSE:
            return self.state.pause if self.state.HasField("pause") else None
        return self.state.params.get(name)

    def take(self, name: str, want: pb.DesiredParam) -> int:
        """Hold `want` for `name`; returns its version, or 0 when that change is held already
        (the same change seen again, after a reconnect)."""
        held = self.entry(name)
        if held is not None and held.change_id == want.change_id:
            return 0
        self._previous[name] = copy(held) if held is not None else None
        version = self.state.version + 1
        entry = self.state.pause if name == PAUSE else self.state.params[name]
        entry.CopyFrom(want)
        entry.version = version
        self.state.version = version
        return version

    def restore(self, name: str) -> None:
        """Back to what `name` held before the last `take`: that change was not written, or
        was applied nowhere (missed)."""
        if name not in self._previous:
            return
        previous = self._previous.pop(name)
        if previous is None:
            self.drop(name)
            return
        entry = self.state.pause if name == PAUSE else self.state.params[name]
        entry.CopyFrom(previous)
        self.state.version += 1

    def set(self, name: str, value: Any, at_step: int = 0, at_once: bool = False) -> str:
        """Want `name` = `value` (from code, not the wire); returns the new change's id."""
        want = change(value, at_step, at_once)
        self.take(name, want)
        return want.change_id

    def drop(self, name: str) -> int:
        """Forget a parameter's desired value (the worker keeps what it has); returns the
        version that no longer holds it, or 0 when there was none."""
        if self.entry(name) is None:
            return 0
        if name == PAUSE:
            self.state.ClearField("pause")
        else:
            del self.state.params[name]
        self._previous.pop(name, None)
        self.state.version += 1
        return self.state.version

    def rebase(
        self, settled: set[str] | None = None, in_effect: dict[str, pb.DesiredParam] | None = None
    ) -> dict[str, pb.DesiredParam]:
        """The state restarted replicas start from: none waits for a step number of the
        incarnation before. A change `settled` there (in effect, or agreed on by the ranks
        and waiting for its step; every one when not told) applies at once, before the first
        step, with no agreement: the ranks had all taken it (each key of it that a later
        change has not replaced: those left no longer make the whole change, and apply as
        they are, together when they are several). A change that was still waiting
        keeps waiting for the ranks to agree on it (it may have reached some ranks before
        their restart and others after: no rank applies it until all agree), and carries
        the change `in_effect` before it as its base, which the new worker applies at once
        meanwhile. An action not done yet (snapshot, rollback, save) waits as any change
        does, with no base. Returns, per name, what the new worker starts from at once
        (as a base)."""
        starts = {}
        entries = list(self.state.params.items())
        if self.state.HasField("pause"):
            entries.append((PAUSE, self.state.pause))
        for name, entry in entries:
            entry.at_step = 0
            if name in ACTIONS:  # not done yet (once done it goes): done by the next worker
                entry.at_once = False
                entry.ClearField("base")
                continue
            if settled is None or entry.change_id in settled:
                entry.at_once = True
                entry.ClearField("base")
                entry.ClearField("together")  # what is left of it is in effect, key by key
                starts[name] = base_of(entry)
            elif (base := (in_effect or {}).get(name)) is not None:
                entry.base.CopyFrom(base_of(base))
                starts[name] = copy(entry.base)
        self.state.version += 1
        return starts


def _held(mailbox) -> DesiredConfig | None:
    """The desired state a replica's mailbox holds (None when it holds none, or a torn one)."""
    from loomrun.mailbox import MailboxError

    try:
        _, state = mailbox.desired.read()
    except MailboxError:
        return None
    if state is None:
        return None
    desired = DesiredConfig()
    desired.state.CopyFrom(state)
    return desired


def restart_from(mailbox) -> None:
    """A replica's mailbox made ready for its next worker, on a job with no control plane:
    a clean worker side (the last may have died mid-write), and the desired state it held,
    rebased, so that no step number of the last incarnation carries over (without a broker
    nothing was steered, and what the mailbox holds applies at once), without an action
    (a save on SIGUSR1: nothing says whether it was done, and a save is not done twice)."""
    mailbox.reset_worker_side()
    desired = _held(mailbox)
    if desired is not None:
        for name in ACTIONS & set(desired.state.params):  # asked of the worker before (SIGUSR1)
            desired.drop(name)
        desired.rebase()
        mailbox.desired.write(desired.state)


def ask_once(mailbox, name: str, want: pb.DesiredParam) -> None:
    """An action (a save on SIGUSR1) into a replica's mailbox, on a job with no control
    plane: the desired state it holds, with the action added."""
    desired = _held(mailbox) or DesiredConfig()
    desired.take(name, want)
    mailbox.desired.write(desired.state)
