"""Rules that steer by themselves (`loomrun rule add`): read on each status of the replicas,
acted on as a client's changes would be, recorded in the ledger.

The supervisor reads every status its workers write (about ten a second each); each one
carries, per metric, the last value and the mean, min and max since the status before
(runtime.metrics), so a spike of a few fast steps between two statuses is seen. A rule
looks at units: a replica that trains alone, or the ranks of a process group, whose
values are taken together (`across`: the max of the ranks' values unless the rule says
min or mean) once every rank has reported since the last point. A point that meets the
condition fires the rule: its actions become changes of every replica of the unit, under
one id each (the ranks of a group agree on each as on any change, and act at one step),
written to the desired-config bucket as a client writes them. A rollback goes to the
newest snapshot taken before the window of the point that met the condition (not one
taken during it); `set lr=lr*0.5` is sent as a factor, which the worker applies to the
value in effect at the step the change lands. A rule fires again only once its last
firing's changes were all answered, on a window that began after they were, and
`cooldown` steps after it fired.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable

from google.protobuf.message import DecodeError

from loomrun import fields
from loomrun import params as P
from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.desired import change, new_change_id
from loomrun.metricwindow import Window
from loomrun.output import say
from loomrun.rulebook import MOST_RULES, Rule, read_rule
from loomrun.rulelang import Action, Condition, Metric, RuleError, Watcher

WAIT_LIMIT = 120.0  # seconds a firing's changes may go unanswered before it may fire again


class Unit:
    """One rule's view of a replica, or of the ranks of a group: what each member reported
    since the last point, the condition's history (a Watcher), and its last firing."""

    def __init__(self, members: tuple[str, ...], when: Condition):
        self.members = members
        self.watcher = Watcher(when)
        # member -> metric name -> [last, count, total, low, high] since the last point
        self.pending: dict[str, dict[str, tuple[float, Window]]] = {}  # member -> name ->
        self.steps: dict[str, int] = {}
        self.fired_step: int | None = None
        # change id -> (members yet to answer it, when it was asked)
        self.waiting: dict[str, tuple[set[str], float]] = {}
        self.settled_at = 0  # the step its last firing's changes were all answered by
        self.starts: dict[str, int] = {}  # member -> the step its pending window began at

    def take(self, member: str, status: pb.Status, names: set[str]) -> None:
        """A member's status: its fresh values of `names` kept (a rank may report a metric
        the others do not: the group's point takes the ranks that do)."""
        fresh = [name for name in names if name in status.windows and name in status.metrics]
        if member not in self.pending:  # the first status since the last point
            self.starts[member] = status.window_step
        kept = self.pending.setdefault(member, {})
        for name in fresh:
            window, held = Window.of_pb(status.windows[name]), kept.get(name)
            kept[name] = (status.metrics[name], window if held is None else held[1].merged(window))
        self.steps[member] = status.step

    def point(self, metrics: list[Metric], across: str) -> tuple[int, int, dict] | None:
        """Once every member reported since the last point: the step its window began at
        (the earliest member's: the status the supervisor had read before), the highest of
        the members' steps, and each metric taken across them; the pending values start
        again."""
        if set(self.pending) != set(self.members):
            return None
        point = {}
        for metric in metrics:
            found = [_stat(*kept[metric.name], metric.stat) for kept in self.pending.values()
                     if metric.name in kept]  # fmt: skip
            if found:
                point[metric] = _across(found, across)
        start, high = min(self.starts.values()), max(self.steps.values())
        self.pending.clear()
        return start, high, point

    def may_fire(self, step: int, window_from: int, cooldown: int, now: float) -> bool:
        for change_id, (members, asked) in list(self.waiting.items()):
            if now - asked > WAIT_LIMIT:  # never answered (its write lost): not for ever
                say(f"{', '.join(sorted(members))} gave no answer to {change_id} in "
                    f"{WAIT_LIMIT:.0f}s; the rule may fire again")  # fmt: skip
                del self.waiting[change_id]
        if self.waiting or window_from < self.settled_at:
            return False
        return self.fired_step is None or step >= self.fired_step + cooldown

    def restarted(self) -> None:
        """A member restarts: its steps start again, what it reported and owed is gone."""
        self.pending.clear()
        self.waiting.clear()
        self.fired_step, self.settled_at = None, 0


def _stat(last: float, window: Window, stat: str) -> float:
    if stat == "last" or (stat == "mean" and not window.count):
        return last
    if stat == "mean":
        return window.total / window.count
    return window.low if stat == "min" else window.high


def _across(values: list[float], across: str) -> float:
    if across == "mean" or any(math.isnan(v) for v in values):
        return sum(values) / len(values)
    return min(values) if across == "min" else max(values)


class Rules:
    """The rules of a job, on the supervisor of its node 0: `status` reads each status,
    `answered` each answer; `ask(name, want, replicas)` writes a change as a client would,
    `record(outcome)` keeps a firing in the ledger (and says it as an event)."""

    def __init__(self, job: str, replicas: dict, ask: Callable, record: Callable, on: bool = True,
                 rules: list[pb.Rule] | None = None):  # fmt: skip
        self.job = job
        self.replicas = replicas
        self.ask = ask
        self.record = record
        self.on = on  # off under --replay: the record holds what they did
        self.rules: dict[str, Rule] = {}
        self.outbox = None  # the control plane's: a rule written back to the bucket
        self._watcher = None
        self._task: asyncio.Task | None = None
        self._watching = asyncio.Lock()
        for rule in rules or []:  # a --rules file's: read before, at the launch
            self.put(rule)

    # -- the rules themselves ----------------------------------------------------------

    def put(self, message: pb.Rule) -> str:
        """A rule added (or replaced); "" or why it is refused, in one line."""
        try:
            rule = read_rule(message)
        except RuleError as error:
            return str(error)
        if message.name not in self.rules and len(self.rules) >= MOST_RULES:
            return f"rule {message.name}: a job has {MOST_RULES} rules at most"
        held = self.rules.get(message.name)
        if held is not None and held.message == message:
            return ""  # the same rule seen again (a reconnect): its history stays
        self.rules[message.name] = rule
        return ""

    def off(self, why: str) -> None:
        if self.rules and self.on:
            say(f"the job's rules are off: {why}")
        self.on = False

    def remove(self, name: str) -> bool:
        return self.rules.pop(name, None) is not None

    async def start_over(self, kv, earlier: list[str]) -> None:
        """A new run of the job: an earlier run's rules (`earlier`, their keys) leave the
        bucket, and this run's (a --rules file's) go in, before the watch starts."""
        for key in earlier:
            await kv.purge(key)
        for rule in self.listing():
            await kv.put(S.rule(self.job, rule.name), rule.SerializeToString())

    async def watch(self, kv) -> None:
        """The job's rules as the bucket `kv` holds them (`loomrun rule add`, `rule rm`),
        from its current contents on. A rule held here that the bucket lacks (a broker
        whose store was made anew) is written there again."""
        async with self._watching:  # a reconnect's and the first watch, one at a time
            if self._watcher is not None:
                with contextlib.suppress(Exception):
                    await self._watcher.stop()
            if self._task is not None:
                self._task.cancel()
            self._watcher = await kv.watch(S.rule(self.job))
            self._task = asyncio.ensure_future(self._take(self._watcher))

    async def _take(self, watcher) -> None:
        seen: set[str] = set()
        async for entry in watcher:
            if entry is None:  # the bucket's current contents are in
                for rule in self.listing():
                    if rule.name not in seen and self.outbox is not None:
                        self.outbox.put(S.DESIRED, S.rule(self.job, rule.name), rule)
                continue
            name = S.last_token(entry.key)
            seen.add(name)
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                if self.remove(name):
                    say(f"rule {name} removed")
                continue
            try:
                rule = pb.Rule.FromString(entry.value)
            except DecodeError:
                say(f"ignored rule {name}: not a Rule")
                continue
            if rule.name != name:
                say(f"ignored rule {name}: it names itself {rule.name[:64]!r}")
                continue
            known = name in self.rules
            refused = self.put(rule)
            if refused:
                say(f"ignored {refused}")
            elif not known:
                say(f"rule {name}: when {rule.when}, then {rule.then}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # -- statuses and answers in -------------------------------------------------------

    def reading(self) -> bool:
        """Whether every status is wanted (a rule is on)."""
        return self.on and bool(self.rules)

    def status(self, replica: str, status: pb.Status) -> None:
        if not self.on or not self.rules:
            return
        members = self._unit_of(replica)
        if members is None:
            return  # a rank of a group whose every rank has not said so yet
        for rule in list(self.rules.values()):
            try:
                self._status(rule, replica, members, status)
            except Exception as error:  # noqa: BLE001 - a rule never stops the pump
                self.rules.pop(rule.message.name, None)
                say(f"rule {rule.message.name} is off for this run: it failed ({error!r})")

    def _status(self, rule: Rule, replica: str, members: tuple, status: pb.Status) -> None:
        scope = set(rule.message.replicas)
        if scope and not scope & set(members):
            return
        unit = rule.units.get(members)
        if unit is None:
            for other in [m for m in rule.units if replica in m]:  # the group changed
                del rule.units[other]
            unit = rule.units[members] = Unit(members, rule.when)
        unit.take(replica, status, {metric.name for metric in rule.when.metrics})
        found = unit.point(rule.when.metrics, rule.message.across or "max")
        if found is None:
            return
        window_from, step, point = found  # whole at the last member's status
        seen = unit.watcher.see(point)
        cooldown = rule.message.cooldown
        if seen and seen[0] and unit.may_fire(step, window_from, cooldown, time.monotonic()):
            self._fire(rule, unit, step, window_from, seen[1])

    def answered(self, replica: str, outcome: pb.Outcome) -> None:
        for rule in self.rules.values():
            for unit in rule.units.values():
                waiting = unit.waiting.get(outcome.change_id, (None,))[0]
                if waiting is None or replica not in waiting:
                    continue
                waiting.discard(replica)
                unit.settled_at = max(unit.settled_at, outcome.step)
                if not waiting:
                    del unit.waiting[outcome.change_id]

    def restarting(self, replica: str) -> None:
        """A member restarts: what it had reported, and answers it owed, are gone."""
        for rule in self.rules.values():
            for members in [m for m in rule.units if replica in m]:
                rule.units[members].restarted()

    def _unit_of(self, replica: str) -> tuple[str, ...] | None:
        """A replica alone, or every replica of this node in its process group (None
        until every one of them has said it is in the group)."""
        schema = self.replicas[replica].schema
        if schema is None or schema.group_size <= 1:
            return (replica,)
        members = tuple(sorted(
            name for name, view in self.replicas.items()
            if view.schema is not None and view.schema.group_size == schema.group_size
        ))  # fmt: skip
        return members if len(members) == schema.group_size else None

    # -- a firing ----------------------------------------------------------------------

    def _fire(self, rule: Rule, unit: Unit, step: int, window_from: int, values: dict) -> None:
        firing = new_change_id()
        origin = f"rule {rule.message.name}"
        changes, problems = [], []
        for i, action in enumerate(rule.then, start=1):
            try:
                changes += self._changes(action, unit, window_from, origin, f"{firing}-{i}")
            except (P.ParamError, RuleError, ValueError) as error:
                problems.append(f"{action}: {error}")
        shown = ", ".join(f"{k}={_number(v)}" for k, v in values.items())
        reason = f"{rule.message.when} ({shown}); then {rule.message.then}"
        if problems:
            reason += "; not asked: " + "; ".join(problems)
        for member in unit.members:
            self.record(pb.Outcome(
                name=rule.message.name, state=pb.FIRED, step=step, reason=reason,
                change_id=firing, origin=origin, replica=member, time=time.time(),
                metrics={k: v for k, v in values.items() if math.isfinite(v)},
            ))  # fmt: skip
        for name, want in changes:
            unit.waiting[want.change_id] = (set(unit.members), time.monotonic())
            self.ask(name, want, list(unit.members))
        unit.fired_step = step
        who = unit.members[0] if len(unit.members) == 1 else ", ".join(unit.members)
        say(f"rule {rule.message.name} fired at step {step} on {who}: {reason}")

    def _changes(self, action: Action, unit: Unit, window_from: int, origin: str, change_id: str):
        """The changes (name, DesiredParam) of one action of a firing."""
        ask = lambda value, **kw: change(value, origin=origin, change_id=change_id, **kw)  # noqa: E731
        if action.word in ("pause", "resume"):
            return [(S.PAUSE, ask(action.word == "pause"))]
        if action.word == "snapshot":
            return [(S.SNAPSHOT, ask({"name": action.arg}))]
        if action.word == "rollback":
            value = {"name": action.arg} if action.arg else {"before": max(window_from, 1)}
            return [(S.ROLLBACK, ask(value))]
        if action.word == "save":
            return [(S.SAVE, ask({"dir": action.arg}))]
        if action.word == "unset":
            keys = list(action.keys)
            return [(key, ask(None, kind=pb.UNSET, together=keys)) for key in keys]
        keys = [a.key for a in action.assigns]
        made = []
        for assign in action.assigns:
            if assign.op:
                by = {"*": assign.number, "/": 1 / assign.number,
                      "+": assign.number, "-": -assign.number}[assign.op]  # fmt: skip
                kind = pb.SCALE if assign.op in "*/" else pb.SHIFT
                made.append((assign.key, ask(float(by), kind=kind, together=keys)))
            else:
                value = P.parse(self._spec(assign.key, unit), assign.text)
                made.append((assign.key, ask(fields.to_wire(value), together=keys)))
        return made

    def _spec(self, key: str, unit: Unit) -> P.ParamSpec:
        base, path = fields.split(key)
        for member in unit.members:
            schema = self.replicas[member].schema
            for spec in schema.params if schema is not None else ():
                if spec.name == base:
                    found = P.spec_from_pb(spec)
                    return fields.field_spec(found, path) if path else found
        raise RuleError(f"the replicas have no parameter {base!r}")

    def listing(self) -> list[pb.Rule]:
        return [rule.message for rule in self.rules.values()]


def _number(value: float) -> str:
    return f"{value:.6g}"
