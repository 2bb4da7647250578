"""The worker's side of loomrun: the step boundary, applying desired changes, status.

The step boundary is the hottest path of loomrun. When nothing changed it costs one
integer read from the mailbox, one store of the step counter, two compares and a clock
read; everything else (reading the desired state, applying, answering, writing status)
happens off that path.

Every change the worker reads gets exactly one answer, named by the change's id: applied,
rejected, overridden (an optimizer's own step wrote over it: not in effect), missed (its
step had passed) or superseded (a later change to the same parameter replaced it before
it was due). A change to a value an optimizer steps with is answered after the step that
ran with it; one written over later gets a second record, overridden and `ended`.

Ranks of one process group take group changes only at agreement points, about every 20 ms
of steps (runtime.group; and the next few steps while a change has reached some ranks
only), where they compare (in band, one tiny collective) what they hold: each rank applies
the same changes at the same step, or none.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from loomrun import fields
from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb
from loomrun.mailbox import Mailbox, MailboxError
from loomrun.outcomes import answer, answer_change, names_of
from loomrun.runtime.answers import AnswerBook
from loomrun.runtime.change import (
    by_change,
    composed,
    entries,
    fill,
    lead,
    missed,
    read_plan,
    recorded_change,
    refusal,
    reshaped,
    whole,
    worked_out,
)
from loomrun.runtime.metrics import Metrics
from loomrun.runtime.snapshots import Snapshots
from loomrun.runtime.target import Target
from loomrun.subjects import OWN_NAMES, PAUSE

STATUS_INTERVAL = 0.1
PAUSE_POLL = 0.005
_NEVER = math.inf


class Worker:
    """One worker's runtime state, bound to its mailbox: the step boundary, the desired
    state and its agreement among ranks, applying changes to the targets, and the status.
    Its answers are kept by an AnswerBook, its metrics by Metrics. Made by `attach` in a
    worker process; runtime.api, runtime.optim and runtime.group call it."""

    def __init__(self, mailbox: Mailbox):
        self.mailbox = mailbox
        self.step = 0
        self.explicit_steps = False
        self.paused = False
        self.targets: dict[str, Target] = {}
        self.metrics = Metrics(self.warn_once)
        self.answers = AnswerBook(self.warn_once)
        self.snapshots = Snapshots(self)  # snapshot, rollback, save; the periodic ones
        self.ignores_usr1 = False  # boot set SIGUSR1 aside (a scheduler's, for the supervisor)
        self.applied_listeners = self.answers.listeners
        # The process group's agreement (runtime.group), once torch.distributed is set up.
        self.group = None
        # Launched as one of several ranks: until the script sets up its process group or
        # takes its first step (without one), a change waits: no rank applies alone what
        # its group will agree on.
        self.expect_group = os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1")
        self._step_view = mailbox.step
        self._seq_view = mailbox.desired.seq
        self._seen = 0
        self._desired = pb.DesiredState()
        # Checks run with each status: the steered names no longer in effect (name -> why).
        self.audits: dict[Any, Any] = {}
        self._scheduled: dict[str, pb.DesiredParam] = {}  # agreed, waiting for their step
        self._replay: deque[dict] = deque()  # recorded changes, each for its step
        self._due = _NEVER
        self._next_status = 0.0
        self._warned: set[str] = set()

    # -- the hot path --------------------------------------------------------------

    def boundary(self) -> None:
        """Called between two steps: counts the step, applies what is due, reports status."""
        step = self.step = self.step + 1
        self._step_view[0] = step
        if self._seq_view[0] != self._seen or step >= self._due:
            self.sync()
        now = time.monotonic()
        if now >= self._next_status:
            self.write_status(now)

    # -- desired state ---------------------------------------------------------------

    def sync(self, at_boundary: bool = True) -> None:
        """Read the latest desired state and apply whatever is due; block while paused.
        Agreement with the other ranks happens only at a boundary: they all reach it."""
        if self._read_desired() | self._settle(agree=at_boundary):
            self._write_acks()
        if not at_boundary:
            if self.paused:
                self._due = 0  # paused before the first step: stop at the first boundary
            return
        if self.paused and self.answers.parked():  # no step while paused: as they stand
            self.stepped(self.answers.parked(), {})
        while self.paused:
            time.sleep(PAUSE_POLL)
            if self._read_desired() | self._settle(agree=False):
                self._write_acks()
            now = time.monotonic()
            if now >= self._next_status:
                self.write_status(now)

    def _read_desired(self) -> bool:
        """Take the latest desired state; answer `superseded` for every change held unanswered
        that the new state replaces. True when a new state was read (the acks say so)."""
        if self._seq_view[0] == self._seen:
            return False
        try:
            seq, desired = self.mailbox.desired.read()
        except MailboxError as error:
            self._seen = self._seq_view[0]
            self.warn_once(str(error))
            return False
        self._seen = seq
        if desired is None:
            return False
        now = entries(desired)
        for change_id, parts in by_change(entries(self._desired)).items():
            replaced = any(n not in now or now[n].change_id != change_id for n in parts)
            # One never held whole was never read: the supervisor answers it.
            if replaced and whole(parts) and self._open(*lead(parts)):
                self._answer(answer_change(parts, pb.SUPERSEDED, self.step), quiet=True)
        self._desired = desired
        return True

    def _open(self, name: str, want: pb.DesiredParam) -> bool:
        """Not answered yet, nor in effect (a change put back after a later one was missed),
        nor agreed on and waiting for its step."""
        if self.answers.settled(name, want.change_id):
            return False
        scheduled = self._scheduled.get(name)
        return scheduled is None or scheduled.change_id != want.change_id

    def _settle(self, agree: bool) -> bool:
        """Apply every change that is due now; note when the next one is. True if any was."""
        step, due, answered = self.step, _NEVER, False
        if agree and step >= self.snapshots.next_due:  # at a boundary: before any change
            self.snapshots.due(step)
        while self._replay and self._replay[0]["step"] <= step:
            answered = True
            recorded = self._replay.popleft()
            self._answer(self._decide(recorded_change(recorded), step), replayed=True)
        if self._replay:
            due = self._replay[0]["step"]
        now_due = {n: w for n, w in self._scheduled.items() if step >= w.at_step}
        for name in now_due:
            del self._scheduled[name]
        for parts in by_change(now_due).values():
            self._answer(self._decide(parts, step))
            answered = True
        due = min([due, *(w.at_step for w in self._scheduled.values())])
        grouped, starting = {}, set()
        found = entries(self._desired)
        bases = {
            name: want.base
            for name, want in found.items()
            if want.HasField("base") and self._open(name, want)
            and self.answers.fresh(name) and self._open(name, want.base)
        }  # fmt: skip
        starts = {base.change_id for base in bases.values()}
        for name, want in found.items():  # what is left in effect of the same change
            fits = want.at_once and want.change_id in starts and name not in bases
            if fits and self._open(name, want):
                bases[name] = want
        for parts in by_change(bases).values():  # a restart's start, each change whole
            if any(self._declared_later(part, step) for part in parts):  # not targets yet
                starting |= set(parts)
                continue
            self._answer(self._decide(parts, step))
            answered = True
        if starting:
            due = min(due, 2)
        for parts in by_change(found).values():
            name, want = lead(parts)
            if not self._open(name, want) or not whole(parts) or starting & set(parts):
                continue  # answered; a key of it replaced since; or its start waits
            resume = name == PAUSE and not want.value.b  # paused ranks cannot agree
            if self.group is not None and not want.at_once and not resume:
                grouped.update(parts)
                continue
            if self.expect_group and self.group is None and step == 0 and not want.at_once:
                due = min(due, 1)
                continue
            if any(self._declared_later(part, step) for part in parts):
                due = min(due, 2)
                continue
            if want.at_step > step:
                due = min(due, want.at_step)
                continue
            self._answer(self._decide(parts, step))
            answered = True
        if self.group is not None:
            if agree and step in self.group.points:
                answered |= self._agree(grouped, step)
                due = min([due, *(w.at_step for w in self._scheduled.values())])
            due = min(due, self.group.points.after(step))
        self._due = min(due, self.snapshots.next_due)
        return answered

    def _declared_later(self, name: str, step: int) -> bool:
        """Not a target yet, but it may be soon: declared by the script as it starts, or by
        its optimizer at its first step."""
        return fields.base(name) not in self.targets and name not in OWN_NAMES and step < 2

    def _agree(self, grouped: dict[str, pb.DesiredParam], step: int) -> bool:
        """One collective: the changes every rank holds alike, every rank takes now (or
        schedules for their step); the others wait for the next agreement point."""
        agreed = self.group.agree(grouped, step)
        for parts in by_change({name: grouped[name] for name in sorted(agreed)}).values():
            _, want = lead(parts)
            if want.at_step > step:
                self._supersede_scheduled(list(parts), want.change_id)
                self._scheduled.update(parts)
            else:
                self._answer(self._decide(parts, step, agreed=True))
        return bool(agreed)

    def _supersede_scheduled(self, names: list[str], change_id: str) -> None:
        """A later change to one of `names` was taken: one agreed on earlier, still waiting
        for its step, will not apply, none of it (every rank decides this at the same
        step)."""
        for name in names:
            scheduled = self._scheduled.get(name)
            if scheduled is None or scheduled.change_id == change_id:
                continue
            parts = {n: w for n, w in self._scheduled.items() if w.change_id == scheduled.change_id}
            for part in parts:
                del self._scheduled[part]
            self._answer(answer_change(parts, pb.SUPERSEDED, self.step), quiet=True)

    def replay(self, plan: list[dict]) -> None:
        """Apply these recorded changes, each at its step."""
        self._replay.extend(plan)
        self._due = 0

    def _decide(self, parts: dict[str, pb.DesiredParam], step: int, agreed=False) -> pb.Outcome:
        """The answer to one change (`parts`: each parameter of it, name -> its entry)."""
        name, want = lead(parts)
        if 0 < want.at_step < step:
            return answer_change(parts, pb.MISSED, step, missed(want.at_step, step, agreed))
        if name == PAUSE:
            return self._set_paused(want)
        if name in OWN_NAMES:  # an action on the training state, or the periodic snapshots
            return self.snapshots.act(parts, step)
        return self._apply(parts)

    def _apply(self, parts: dict[str, pb.DesiredParam]) -> pb.Outcome:
        """Every parameter of the change into effect, or none: each value is checked first,
        against the parameters the change itself brings (`set optimizer=adamw betas=...`);
        the handlers run first (a handler may raise), then what reshapes the parameters,
        then the optimizer's values; one that fails puts those run before it back. Each
        part's old value is the one before the change (not after the reshape)."""
        outcome = answer_change(parts, pb.REJECTED, self.step)
        several = len(parts) > 1
        coming, going = reshaped(parts, self.targets)
        unknown = [
            n for n in map(fields.base, parts)
            if (n not in self.targets or n in going) and n not in coming
        ]  # fmt: skip
        if unknown:
            name = unknown[0]
            known = ", ".join(sorted(self.targets)) or "none declared"
            outcome.reason = (
                f"{name} is not a parameter once this very change is applied"
                if name in going
                else f"unknown parameter {name!r} (this replica has: {known})"
            )
            return outcome
        try:
            arithmetic, parts = parts, worked_out(parts, self.targets)
        except P.ParamError as error:
            outcome.reason = str(error)
            return outcome
        if several and (refused := refusal(parts, self.targets)):
            outcome.reason = refused
            return outcome
        try:
            wants, fielded = composed(parts, self.targets)
        except Exception as error:  # noqa: BLE001 - a change never breaks the script's step
            known = isinstance(error, P.ParamError)
            outcome.reason = str(error) if known else f"its fields could not be applied: {error!r}"
            return outcome

        def order(name: str) -> tuple:
            """The handlers (which may raise), what reshapes, then the optimizer's values
            (one the change brings comes after what brings it)."""
            target = self.targets.get(name)
            if target is None or target.kept:
                return (2, name)
            return (1 if target.reshapes is not None else 0, name)

        # A part applied after a reshape would read its old value from the new kind.
        reshaping = any(t.reshapes for n in wants if (t := self.targets.get(n)) is not None)
        olds = {}
        for name in wants if reshaping else ():
            with contextlib.suppress(Exception):  # one that cannot be read has no old value
                olds[name] = P.to_pb(self.targets[name].get())
        done: list[tuple[Target, pb.Outcome]] = []
        for name in sorted(wants, key=order):
            target, said = self.targets.get(name), pb.Outcome(name=name)
            if target is None:
                said.reason = f"{name} did not come with the change it was expected with"
            if target is None or not target.apply(wants[name], said):
                undone = [earlier.restore() for earlier, _ in reversed(done)]
                outcome.reason = "; ".join([said.reason, *filter(None, undone)])  # named
                return outcome
            done.append((target, said))
        outcome.state = pb.APPLIED
        reasons = []
        for target, said in done:
            name = said.name
            if reshaping:
                said.ClearField("old")
                if name in olds and name not in coming:  # a part the change brings had none
                    said.old.CopyFrom(olds[name])
            if target.note is not None:  # what it did, as it stands with the whole change
                said.reason = target.note()
            for part, (old, new) in fielded.get(name, {}).items():  # each field's own
                field = pb.Outcome(name=part, new=P.to_pb(new))
                if old is not None:
                    field.old.CopyFrom(P.to_pb(old))
                fill(outcome, part, field)
                self.answers.took(part, parts[part])
            if name in parts and arithmetic[name] is not parts[name]:  # lr*0.5 came to:
                said.new.CopyFrom(parts[name].value)
            if name not in fielded:
                fill(outcome, name, said)
                self.answers.took(name, parts[name])
            if said.reason:
                reasons.append(f"{name}: {said.reason}" if several else said.reason)
        outcome.reason = "; ".join(reasons)
        kept = [n for n, w in wants.items() if self.targets[n].kept and w.kind != pb.UNSET]
        if kept and not self.paused:
            self.answers.park(kept, outcome)  # answered once a step ran with them
        return outcome

    def _set_paused(self, want: pb.DesiredParam) -> pb.Outcome:
        outcome = answer(want, PAUSE, pb.REJECTED, self.step)
        if want.value.WhichOneof("kind") != "b":
            outcome.reason = "the paused flag must be a boolean"
            return outcome
        outcome.old.b = self.paused
        outcome.state = pb.APPLIED
        self.paused = want.value.b
        return outcome

    def _answer(self, outcome: pb.Outcome, quiet: bool = False, replayed: bool = False) -> None:
        """Every change read gets one answer; `quiet` ones (superseded) leave the name open
        for the change that replaced it. Only a change taken replaces one the ranks agreed
        on that waits for its step (a refused one, even forced on one rank, does not). A
        `replayed` one is of the record, outside the desired state: the live changes there
        stay answered (or scheduled) as they were, and none is applied again for it."""
        if not quiet and not replayed and outcome.state in (pb.APPLIED, pb.OVERRIDDEN):
            self._supersede_scheduled(names_of(outcome), outcome.change_id)
        self.answers.give(outcome, quiet, replayed)

    def stepped(
        self, done: set[str], replaced: dict[str, Any], why: dict[str, str] | None = None
    ) -> None:
        """After an optimizer's step, while loomrun steers (see AnswerBook.stepped)."""
        if self.answers.stepped(done, replaced, why, self.step):
            self._write_acks()

    def _write_acks(self) -> None:
        acks = self.answers.acks(
            self.mailbox.outcomes_read[0], self._desired.version,
            list(self._scheduled.values()), self.mailbox.acks.capacity,
        )  # fmt: skip
        self._write(self.mailbox.acks, acks)
        self.write_status(time.monotonic())

    # -- targets and schema ------------------------------------------------------------

    def recheck(self) -> None:
        """Look at the desired state again at the next boundary (new targets appeared)."""
        self._due = 0

    def add_target(self, target: Target) -> None:
        self.targets[target.spec.name] = target
        self.write_schema()
        if self._settle(agree=False):
            self._write_acks()

    def join_group(self, group) -> None:
        """This worker now trains in a process group: group changes wait for agreement."""
        self.group = group
        self.expect_group = False
        self.write_schema()
        self._due = 0

    def leave_group(self) -> None:
        self.group = None
        self.write_schema()

    def write_schema(self) -> None:
        schema = pb.Schema(params=[P.spec_to_pb(t.spec) for t in self.targets.values()])
        if self.group is not None:
            schema.group_size, schema.group_rank = self.group.size, self.group.rank
            schema.agree_every = self.group.every or 0  # 0: points follow the steps' time
        self._write(self.mailbox.schema, schema)

    # -- status ----------------------------------------------------------------------

    def write_status(self, now: float, final: bool = False) -> None:
        for audit in list(self.audits.values()):
            ended = audit()
            if ended:
                found = {name: self.targets[name].get() for name in ended if name in self.targets}
                self.stepped(set(), found, why=ended)  # writes the acks, and a status
        rate = self.metrics.rate(now, self.step)
        numbers, windows = self.metrics.numbers(now, final, self.mailbox.status_read[0])
        status = pb.Status(
            step=self.step, steps_per_sec=rate, metrics=numbers, paused=self.paused,
            time=time.time(), pid=os.getpid(), applied_version=self._desired.version,
            window_step=self.metrics.window_step,
        )  # fmt: skip
        for target in self.targets.values():
            target.show(status, P.LARGEST_VALUE)
        for key, window in windows.items():
            window.to_pb(status.windows[key])
        status.snapshots.extend(self.snapshots.infos())
        status.snapshot_every, status.snapshot_keep = self.snapshots.every, self.snapshots.keep
        self.metrics.written(self._write(self.mailbox.status, status), self.step)
        self._next_status = now + STATUS_INTERVAL

    def final_status(self) -> None:
        """At exit, however the script ended: where it really stopped, not the last periodic
        status (which can be a tenth of a second of steps behind)."""
        if not self.mailbox.closed:
            if self.answers.parked():  # no step after them: in effect as they stand
                self.stepped(self.answers.parked(), {})
            self.write_status(time.monotonic(), final=True)

    def _write(self, slot, message) -> int:
        """The slot's new number, or 0 when it could not be written (said once)."""
        try:
            return slot.write(message)
        except MailboxError as error:
            self.warn_once(str(error))
            return 0

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            print(f"loomrun: {message}", file=sys.stderr, flush=True)


current: Worker | None = None


def attach() -> Worker | None:
    """Attach to the mailbox the supervisor made for this worker; None outside loomrun."""
    global current
    path = os.environ.get("LOOMRUN_MAILBOX")
    if not path or current is not None:
        return current
    try:
        mailbox = Mailbox.attach(Path(path))
    except MailboxError as error:
        print(f"loomrun: {error}; this worker runs without live control", file=sys.stderr)
        return None
    current = Worker(mailbox)
    plan = os.environ.get("LOOMRUN_REPLAY")
    if plan:
        try:
            current.replay(read_plan(plan))
        except (OSError, ValueError, RecursionError) as error:
            current.warn_once(f"cannot read the replay schedule {plan} ({error}); no replay")
    current.write_schema()
    current.sync(at_boundary=False)
    current.write_status(time.monotonic())
    atexit.register(current.final_status)
    return current
