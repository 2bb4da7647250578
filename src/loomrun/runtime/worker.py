"""The worker's side of loomrun: the step boundary, applying desired changes, status.

The step boundary is the hottest path of loomrun. When nothing changed it costs one
integer read from the mailbox, two compares and a clock read; everything else (reading
the desired state, applying, acknowledging, writing status) happens off that path.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb
from loomrun.mailbox import Mailbox, MailboxError

STATUS_INTERVAL = 0.1
PAUSE_POLL = 0.005
PAUSE = "pause"
_NEVER = math.inf


class Target:
    """Something a parameter's value goes into: a declared param, a handler, an optimizer key."""

    def __init__(self, spec: P.ParamSpec, get: Callable[[], Any], put: Callable[[Any], None]):
        self.spec = spec
        self.get = get
        self.put = put


class Worker:
    """One worker's runtime state, bound to its mailbox."""

    def __init__(self, mailbox: Mailbox):
        self.mailbox = mailbox
        self.step = 0
        self.explicit_steps = False
        self.paused = False
        self.targets: dict[str, Target] = {}
        self.metrics: dict[str, float] = {}
        self.outcomes: dict[str, pb.Outcome] = {}
        self._applied: dict[str, int] = {}
        self._desired: pb.DesiredState | None = None
        self._seq_view = mailbox.desired.seq
        self._seen = 0
        self._due = _NEVER
        self._next_status = 0.0
        self._rate_mark: tuple[float, int] | None = None
        self._rate = 0.0
        self._warned: set[str] = set()
        # Names whose target appears with the first optimizer: a change to them waits
        # for it instead of being rejected, unless stepping shows there is no optimizer.
        self.awaiting: frozenset[str] = frozenset()

    # -- the hot path --------------------------------------------------------------

    def boundary(self) -> None:
        """Called between two steps: counts the step, applies what is due, reports status."""
        self.step += 1
        if self._seq_view[0] != self._seen or self.step >= self._due:
            self.sync()
        now = time.monotonic()
        if now >= self._next_status:
            self.write_status(now)

    # -- desired state ---------------------------------------------------------------

    def sync(self) -> None:
        """Read the latest desired state and apply whatever is due; block while paused."""
        self._read_desired()
        self._apply_due()
        while self.paused:
            time.sleep(PAUSE_POLL)
            if self._seq_view[0] != self._seen:
                self._read_desired()
                self._apply_due()
            now = time.monotonic()
            if now >= self._next_status:
                self.write_status(now)

    def _read_desired(self) -> None:
        try:
            seq, desired = self.mailbox.desired.read()
        except MailboxError as error:
            self._seen = self._seq_view[0]
            self.warn_once(str(error))
            return
        self._seen = seq
        if desired is not None:
            self._desired = desired

    def _apply_due(self) -> None:
        desired = self._desired
        if desired is None:
            self._due = _NEVER
            return
        due, answered = _NEVER, False
        for name, want in desired.params.items():
            if want.version <= self._applied.get(name, 0):
                continue
            target = self.targets.get(name)
            if target is None and name in self.awaiting and self.step < 2:
                due = min(due, 2)
                continue
            if want.at_step > 0 and self.step < want.at_step:
                due = min(due, want.at_step)
                continue
            self._applied[name] = want.version
            self.outcomes[name] = self._apply(name, target, want)
            answered = True
        if desired.pause_version > self._applied.get(PAUSE, 0):
            if desired.pause_at_step > 0 and self.step < desired.pause_at_step:
                due = min(due, desired.pause_at_step)
            else:
                self._applied[PAUSE] = desired.pause_version
                self.outcomes[PAUSE] = self._set_paused(desired)
                answered = True
        self._due = due
        if answered:
            self._write(self.mailbox.acks, pb.Acks(outcomes=self.outcomes))
            self.write_status(time.monotonic())

    def _apply(self, name: str, target: Target | None, want: pb.DesiredParam) -> pb.Outcome:
        outcome = pb.Outcome(name=name, version=want.version, step=self.step, time=time.time())
        outcome.new.CopyFrom(want.value)
        outcome.late = 0 < want.at_step < self.step
        if target is None:
            known = ", ".join(sorted(self.targets)) or "none declared"
            outcome.reason = f"unknown parameter {name!r} (this replica has: {known})"
            return outcome
        try:
            old = target.get()
            value = P.check(target.spec, P.from_pb(want.value))
            target.put(value)
        except P.ParamError as error:
            outcome.reason = str(error)
            return outcome
        except Exception as error:  # noqa: BLE001 - a handler's failure is a rejection
            outcome.reason = f"{name} handler raised {type(error).__name__}: {error}"
            return outcome
        if old is not None:
            outcome.old.CopyFrom(P.to_pb(old))
        outcome.applied = True
        return outcome

    def _set_paused(self, desired: pb.DesiredState) -> pb.Outcome:
        outcome = pb.Outcome(
            name=PAUSE,
            version=desired.pause_version,
            step=self.step,
            time=time.time(),
            applied=True,
        )
        outcome.old.b = self.paused
        outcome.new.b = desired.paused
        outcome.late = 0 < desired.pause_at_step < self.step
        self.paused = desired.paused
        return outcome

    # -- targets and schema ------------------------------------------------------------

    def recheck(self) -> None:
        """Look at the desired state again at the next boundary (new targets appeared)."""
        self._due = 0

    def add_target(self, target: Target) -> None:
        self.targets[target.spec.name] = target
        self.write_schema()
        self._apply_due()

    def write_schema(self) -> None:
        schema = pb.Schema(params=[P.spec_to_pb(t.spec) for t in self.targets.values()])
        self._write(self.mailbox.schema, schema)

    # -- status ----------------------------------------------------------------------

    def report(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            try:
                self.metrics[key] = float(value)
            except (TypeError, ValueError):
                self.warn_once(f"metric {key!r} is not a number ({value!r}); it is left out")

    def write_status(self, now: float) -> None:
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
            metrics=self.metrics,
            paused=self.paused,
            time=time.time(),
            pid=os.getpid(),
            applied_version=self._desired.version if self._desired is not None else 0,
        )
        for name, target in self.targets.items():
            try:
                value = target.get()
                if value is not None:
                    status.values[name].CopyFrom(P.to_pb(value))
            except Exception:  # noqa: BLE001, S112 - a value we cannot read is left out
                continue
        self._write(self.mailbox.status, status)
        self._next_status = now + STATUS_INTERVAL

    def _write(self, slot, message) -> None:
        try:
            slot.write(message)
        except MailboxError as error:
            self.warn_once(str(error))

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
    from loomrun.runtime import optim

    optim.install(current)
    current.write_schema()
    current.sync()
    current.write_status(time.monotonic())
    return current
