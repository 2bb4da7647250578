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
import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb
from loomrun.mailbox import Mailbox, MailboxError
from loomrun.outcomes import answer
from loomrun.runtime.target import Target
from loomrun.subjects import PAUSE

STATUS_INTERVAL = 0.1
DEVICE_READ_INTERVAL = 1.0  # seconds between reads of a metric that lives on a GPU
PAUSE_POLL = 0.005
RECENT_OUTCOMES = 512
LARGEST_VALUE = 2048  # bytes of a value repeated in an outcome or a status; larger: left out
_NEVER = math.inf


class Worker:
    """One worker's runtime state, bound to its mailbox."""

    def __init__(self, mailbox: Mailbox):
        self.mailbox = mailbox
        self.step = 0
        self.explicit_steps = False
        self.paused = False
        self.targets: dict[str, Target] = {}
        # Metrics as reported (a tensor stays a tensor): converted only when a status is due,
        # so reporting a GPU loss every step does not sync the device every step.
        self.metrics: dict[str, Any] = {}
        # The script reports a loss of its own: the one torch's backward saw is not taken.
        self.own_loss = False
        self._device_numbers: dict[str, float] = {}  # GPU metrics as last read
        self._next_device_read = 0.0
        # Called with (name, new value, the step it took effect at) of each applied change,
        # once it is answered (LoomCallback logs them).
        self.applied_listeners: list = []
        # The process group's agreement (runtime.group), once torch.distributed is set up.
        self.group = None
        # Launched as one of several ranks: until the script sets up its process group or
        # takes its first step, a change waits, so that no rank applies alone what its
        # group will agree on. (A script without a process group starts stepping first.)
        self.expect_group = os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1")
        self._step_view = mailbox.step
        self._seq_view = mailbox.desired.seq
        self._seen = 0
        self._desired = pb.DesiredState()
        self._answered: dict[str, str] = {}  # name -> id of the change last answered
        self._in_effect: dict[str, str] = {}  # name -> id of the change last applied
        self._in_effect_want: dict[str, pb.DesiredParam] = {}  # name -> that change
        # Changes to values an optimizer steps with, applied at this boundary: answered
        # after the step, applied or overridden (written over by the step itself).
        self._unconfirmed: dict[str, pb.Outcome] = {}
        # Checks run with each status: each returns the steered names no longer in effect
        # (name -> why), as runtime.optim's Optimizers.replaced_groups.
        self.audits: dict[Any, Any] = {}
        self._scheduled: dict[str, pb.DesiredParam] = {}  # agreed, waiting for their step
        self._recent: deque[pb.Outcome] = deque(maxlen=RECENT_OUTCOMES)
        self._replay: deque[dict] = deque()  # recorded changes, each for its step
        self._outcome_seq = 0
        self._due = _NEVER
        self._next_status = 0.0
        self._rate_mark: tuple[float, int] | None = None
        self._rate = 0.0
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
        if self.paused and self._unconfirmed:
            self.stepped(set(self._unconfirmed), {})  # no step while paused: as they stand
        while self.paused:
            time.sleep(PAUSE_POLL)
            if self._read_desired() | self._settle(agree=False):
                self._write_acks()
            now = time.monotonic()
            if now >= self._next_status:
                self.write_status(now)

    def _entries(self, desired: pb.DesiredState) -> dict[str, pb.DesiredParam]:
        entries = dict(desired.params)
        if desired.HasField("pause"):
            entries[PAUSE] = desired.pause
        return entries

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
        now = self._entries(desired)
        for name, held in self._entries(self._desired).items():
            replaced = name not in now or now[name].change_id != held.change_id
            if replaced and self._open(name, held):
                self._answer(self._outcome(name, held, pb.SUPERSEDED), quiet=True)
        self._desired = desired
        return True

    def _open(self, name: str, want: pb.DesiredParam) -> bool:
        """Not answered yet, nor in effect (a change put back after a later one was missed),
        nor agreed on and waiting for its step."""
        if want.change_id in (self._answered.get(name), self._in_effect.get(name)):
            return False
        scheduled = self._scheduled.get(name)
        return scheduled is None or scheduled.change_id != want.change_id

    def _settle(self, agree: bool) -> bool:
        """Apply every change that is due now; note when the next one is. True if any was."""
        step, due, answered = self.step, _NEVER, False
        while self._replay and self._replay[0]["step"] <= step:
            answered = True
            self._answer(self._replayed(self._replay.popleft(), step), replayed=True)
        if self._replay:
            due = self._replay[0]["step"]
        for name, want in list(self._scheduled.items()):
            if step >= want.at_step:
                del self._scheduled[name]
                self._answer(self._decide(name, want, step))
                answered = True
            else:
                due = min(due, want.at_step)
        grouped = {}
        for name, want in self._entries(self._desired).items():
            if not self._open(name, want):
                continue
            base = want.base if want.HasField("base") else None
            fresh = name not in self._answered and name not in self._in_effect
            if base is not None and fresh and self._open(name, base):  # a restart's start
                if self._declared_later(name, step):
                    due = min(due, 2)
                    continue
                self._answer(self._decide(name, base, step))
                answered = True
            resume = name == PAUSE and not want.value.b  # paused ranks cannot agree
            if self.group is not None and not want.at_once and not resume:
                grouped[name] = want
                continue
            if self.expect_group and self.group is None and step == 0 and not want.at_once:
                due = min(due, 1)
                continue
            if self._declared_later(name, step):
                due = min(due, 2)
                continue
            if want.at_step > step:
                due = min(due, want.at_step)
                continue
            self._answer(self._decide(name, want, step))
            answered = True
        if self.group is not None:
            if agree and step in self.group.points:
                answered |= self._agree(grouped, step)
                due = min([due, *(w.at_step for w in self._scheduled.values())])
            due = min(due, self.group.points.after(step))
        self._due = due
        return answered

    def _declared_later(self, name: str, step: int) -> bool:
        """Not a target yet, but it may be soon: declared by the script as it starts, or by
        its optimizer at its first step."""
        return name not in self.targets and name != PAUSE and step < 2

    def _agree(self, grouped: dict[str, pb.DesiredParam], step: int) -> bool:
        """One collective: the changes every rank holds alike, every rank takes now (or
        schedules for their step); the others wait for the next agreement point."""
        agreed = self.group.agree(grouped, step)
        for name in sorted(agreed):
            want = grouped[name]
            if want.at_step > step:
                self._supersede_scheduled(name, want.change_id)
                self._scheduled[name] = want
            else:
                self._answer(self._decide(name, want, step, agreed=True))
        return bool(agreed)

    def _supersede_scheduled(self, name: str, change_id: str) -> None:
        """A later change to `name` was taken: one agreed on earlier, still waiting for its
        step, will not apply (every rank decides this at the same step)."""
        scheduled = self._scheduled.get(name)
        if scheduled is not None and scheduled.change_id != change_id:
            del self._scheduled[name]
            self._answer(self._outcome(name, scheduled, pb.SUPERSEDED), quiet=True)

    def _replayed(self, recorded: dict, step: int) -> pb.Outcome:
        """A change of a replayed record, at its step (or missed, if the worker is past it)."""
        try:
            value = P.to_pb(recorded["value"])
        except (P.ParamError, TypeError, ValueError):
            value = P.to_pb(str(recorded["value"]))
        want = pb.DesiredParam(
            value=value, at_step=recorded["step"], origin="replay",
            change_id=str(recorded.get("change_id", "")),
            kind={"hold": pb.HOLD, "unset": pb.UNSET}.get(recorded.get("kind"), pb.SET),
        )  # fmt: skip
        if want.kind == pb.UNSET:
            want.ClearField("value")
        return self._decide(recorded["name"], want, step)

    def replay(self, plan: list[dict]) -> None:
        """Apply these recorded changes, each at its step."""
        self._replay.extend(plan)
        self._due = 0

    def _decide(self, name: str, want: pb.DesiredParam, step: int, agreed=False) -> pb.Outcome:
        if 0 < want.at_step < step:
            outcome = self._outcome(name, want, pb.MISSED)
            if agreed:
                outcome.reason = (
                    f"the ranks agreed on it at step {step}, after its step {want.at_step}: "
                    "no rank applied it"
                )
            else:
                outcome.reason = f"it arrived at step {step}, after its step {want.at_step}"
            return outcome
        if name == PAUSE:
            return self._set_paused(want)
        return self._apply(name, want)

    def _outcome(self, name: str, want: pb.DesiredParam, state) -> pb.Outcome:
        return answer(want, name, state, self.step)

    def _apply(self, name: str, want: pb.DesiredParam) -> pb.Outcome:
        outcome = self._outcome(name, want, pb.REJECTED)
        target = self.targets.get(name)
        if target is None:
            known = ", ".join(sorted(self.targets)) or "none declared"
            outcome.reason = f"unknown parameter {name!r} (this replica has: {known})"
            return outcome
        try:
            old = target.get()
            if want.kind == pb.UNSET:
                target.unset()
                with contextlib.suppress(TypeError, ValueError, P.ParamError):
                    outcome.new.CopyFrom(P.to_pb(target.get()))
            else:
                value = P.check(target.spec, P.from_pb(want.value))
                if target.kept:
                    target.put(value, want.kind == pb.HOLD)
                else:
                    target.put(value)
        except P.ParamError as error:
            outcome.reason = str(error)
            return outcome
        except Exception as error:  # noqa: BLE001 - a handler's failure is a rejection
            outcome.reason = f"{name} handler raised {type(error).__name__}: {error}"
            return outcome
        if old is not None:
            with contextlib.suppress(TypeError, ValueError):  # one the wire cannot carry
                outcome.old.CopyFrom(P.to_pb(old))
        outcome.state = pb.APPLIED
        self._in_effect_want[name] = want
        if target.kept and want.kind != pb.UNSET and isinstance(value, float):
            now = target.get()
            if isinstance(now, float) and not math.isclose(now, value, rel_tol=1e-9):
                # `new` stays what was asked (a replay asks it again); the reason says
                # what is in effect meanwhile.
                outcome.reason = (
                    f"in effect: {P.format_value(now)}, not {P.format_value(value)}: the "
                    "floor its scheduler was given (eta_min, min_lrs), while the schedule "
                    "times new/old is below it"
                )
        if target.kept and want.kind != pb.UNSET and not self.paused:
            earlier = self._unconfirmed.pop(name, None)  # a newer one before any step ran
            if earlier is not None:
                self._publish(earlier)
            self._unconfirmed[name] = outcome  # answered once a step ran with it
        return outcome

    def _set_paused(self, want: pb.DesiredParam) -> pb.Outcome:
        outcome = self._outcome(PAUSE, want, pb.REJECTED)
        if want.value.WhichOneof("kind") != "b":
            outcome.reason = "the paused flag must be a boolean"
            return outcome
        outcome.old.b = self.paused
        outcome.state = pb.APPLIED
        self.paused = want.value.b
        return outcome

    def _answer(self, outcome: pb.Outcome, quiet: bool = False, replayed: bool = False) -> None:
        """Every change read gets one answer; `quiet` ones (superseded) leave the name open
        for the change that replaced it. A `replayed` one is of the record, outside the
        desired state: the live changes there stay answered (or scheduled) as they were,
        and none is applied again for it."""
        if not quiet and not replayed:
            self._supersede_scheduled(outcome.name, outcome.change_id)
            self._answered[outcome.name] = outcome.change_id
        if outcome.state == pb.APPLIED and not replayed:
            self._in_effect[outcome.name] = outcome.change_id
        if self._unconfirmed.get(outcome.name) is not outcome:
            self._publish(outcome)

    def stepped(
        self, done: set[str], replaced: dict[str, Any], why: dict[str, str] | None = None
    ) -> None:
        """After an optimizer's step, while loomrun steers: the changes it was the last to
        run with (`done`) are answered, applied or overridden; a change in effect that the
        step wrote over (`replaced`: name -> the value found) has ended. `why` says what
        ended a change, when not the step."""
        if not (self._unconfirmed and done) and not replaced:
            return
        for name in [n for n in self._unconfirmed if n in done or n in replaced]:
            outcome = self._unconfirmed.pop(name)
            if name in replaced:
                found = P.format_value(replaced.pop(name))
                outcome.state = pb.OVERRIDDEN
                outcome.reason = (
                    f"the optimizer's own step {outcome.step} wrote {name}={found} over it: "
                    "loomrun cannot keep it in effect here"
                )
            self._publish(outcome)
        for name, value in replaced.items():
            want = self._in_effect_want.get(name, pb.DesiredParam())
            ended = self._outcome(name, want, pb.OVERRIDDEN)
            ended.ended = True
            ended.reason = (why or {}).get(name) or (
                f"the optimizer's own step {self.step} wrote {name}="
                f"{P.format_value(value)} over it: no longer in effect"
            )
            ended.new.Clear()
            with contextlib.suppress(TypeError, ValueError, P.ParamError):
                ended.new.CopyFrom(P.to_pb(value))
            ended.old.CopyFrom(want.value)
            self._publish(ended)
        self._write_acks()

    def _publish(self, outcome: pb.Outcome) -> None:
        """An answer goes out: to the listeners when applied, then to the acks."""
        if outcome.state == pb.APPLIED:
            for listener in self.applied_listeners:
                try:
                    listener(outcome.name, P.from_pb(outcome.new), outcome.step)
                except Exception as error:  # noqa: BLE001 - a listener never breaks a step
                    self.warn_once(f"a listener of applied changes failed: {error!r}")
        for value in (outcome.old, outcome.new):
            if value.ByteSize() > LARGEST_VALUE:  # the client knows what it asked for
                value.Clear()
        self._outcome_seq += 1
        outcome.seq = self._outcome_seq
        self._recent.append(outcome)

    def _write_acks(self) -> None:
        read = self.mailbox.outcomes_read[0]
        while self._recent and self._recent[0].seq <= read:  # the supervisor has those
            self._recent.popleft()
        # Held too: the changes applied and waiting for their step's end to be answered
        # (the supervisor must not take them for replaced before the worker read them).
        waiting = [*self._scheduled.values(), *self._unconfirmed.values()]
        acks = pb.Acks(
            recent=self._recent,
            read_version=self._desired.version,
            scheduled=[w.change_id for w in waiting],
        )
        while acks.ByteSize() > self.mailbox.acks.capacity and len(acks.recent) > 1:
            del acks.recent[: len(acks.recent) // 4 or 1]  # the oldest were read long ago
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

    def report(self, metrics: dict[str, Any]) -> None:
        if "loss" in metrics:
            self.own_loss = True
        self.metrics.update(metrics)

    def _numbers(self, now: float, final: bool = False) -> dict[str, float]:
        """The metrics as numbers. A tensor on a GPU is read at most once a second (reading
        it waits for the device), and never while a CUDA graph is being captured."""
        numbers = {}
        read_devices = final or now >= self._next_device_read
        for key, value in list(self.metrics.items()):
            on_device = getattr(value, "is_cuda", False) or getattr(value, "is_xpu", False)
            if on_device and not (read_devices and _may_sync(value)):
                if key in self._device_numbers:
                    numbers[key] = self._device_numbers[key]
                continue
            try:
                numbers[key] = float(value)
            except (TypeError, ValueError, RuntimeError):
                del self.metrics[key]
                self.warn_once(f"metric {key!r} is not a number ({value!r}); it is left out")
                continue
            if on_device:
                self._device_numbers[key] = numbers[key]
        if read_devices:
            self._next_device_read = now + DEVICE_READ_INTERVAL
        return numbers

    def write_status(self, now: float, final: bool = False) -> None:
        for audit in list(self.audits.values()):
            ended = audit()
            if ended:
                found = {name: self.targets[name].get() for name in ended if name in self.targets}
                self.stepped(set(), found, why=ended)  # writes the acks, and a status
        if self._rate_mark is None:
            if self.step > 0:  # the rate counts from the first step, not from start-up
                self._rate_mark = (now, self.step)
        else:
            mark_time, mark_step = self._rate_mark
            elapsed = now - mark_time
            if elapsed >= 1.0 or (self._rate == 0.0 and elapsed >= STATUS_INTERVAL):
                self._rate = (self.step - mark_step) / elapsed
                self._rate_mark = (now, self.step)
        status = pb.Status(
            step=self.step,
            steps_per_sec=self._rate,
            metrics=self._numbers(now, final),
            paused=self.paused,
            time=time.time(),
            pid=os.getpid(),
            applied_version=self._desired.version,
        )
        for name, target in self.targets.items():
            try:
                value = target.get()
                if value is not None:
                    wire = P.to_pb(value)
                    if wire.ByteSize() <= LARGEST_VALUE:
                        status.values[name].CopyFrom(wire)
                if target.kept and (own := target.own()) is not None:
                    status.own[name].CopyFrom(P.to_pb(own))
                    if target.held():
                        status.held.append(name)
            except Exception:  # noqa: BLE001, S112 - a value we cannot read is left out
                continue
        self._write(self.mailbox.status, status)
        self._next_status = now + STATUS_INTERVAL

    def final_status(self) -> None:
        """At exit, however the script ended: where it really stopped, not the last periodic
        status (which can be a tenth of a second of steps behind)."""
        if not self.mailbox.closed:
            if self._unconfirmed:  # no step after them: in effect as they stand
                self.stepped(set(self._unconfirmed), {})
            self.write_status(time.monotonic(), final=True)

    def _write(self, slot, message) -> None:
        try:
            slot.write(message)
        except MailboxError as error:
            self.warn_once(str(error))

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            print(f"loomrun: {message}", file=sys.stderr, flush=True)


def _may_sync(value) -> bool:
    """Reading a CUDA tensor while a CUDA graph is captured would break the capture."""
    import torch

    capturing = getattr(torch.cuda, "is_current_stream_capturing", None)
    return not (value.is_cuda and capturing is not None and capturing())


current: Worker | None = None


def _read_plan(path: str) -> list[dict]:
    """This replica's replay schedule (loomrun.replay), as the supervisor wrote it: JSON,
    checked again here (a file can be anything)."""
    plan = json.loads(Path(path).read_text())
    if not isinstance(plan, list):
        raise ValueError("not a list of changes")
    keys = {"step": int, "name": str}
    return [
        c
        for c in plan
        if isinstance(c, dict) and all(isinstance(c.get(k), t) for k, t in keys.items())
    ]


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
            current.replay(_read_plan(plan))
        except (OSError, ValueError, RecursionError) as error:
            current.warn_once(f"cannot read the replay schedule {plan} ({error}); no replay")
    current.write_schema()
    current.sync(at_boundary=False)
    current.write_status(time.monotonic())
    atexit.register(current.final_status)
    return current
