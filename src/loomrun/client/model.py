"""What the client knows and answers: a job, the result of one change on one replica, a
replica's schema, and the listing `get` and the page show."""

from __future__ import annotations

import contextlib
import difflib
import getpass
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from loomrun import fields
from loomrun import params as P
from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.outcomes import (
    OVERTAKEN,
    answer_change,
    kind_word,
    outcome_sentence,
    sentence,
    state_word,
)

NEVER_USED = "no loomrun job has ever run on this broker"


# A replica in one of these states answers nothing: a change to it is not sent.
ENDED = {pb.EXITED: "exited", pb.FAILED: "failed", pb.STOPPED: "stopped"}


class SteerError(Exception):
    """A request that cannot be carried out as asked; one line for a person."""


def origin() -> str:
    """Who asks, as the change's record says: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def this_run(nodes: list[pb.JobInfo]) -> list[pb.JobInfo]:
    """A job's node records of its latest run: an earlier run of the job id on more nodes
    left the records of node ranks this one does not have, and their replicas are not
    this run's (a `set` would wait on them for ever). The latest run is the one of the
    record started last; its nodes that have not started yet still hold the records of
    the run before, until they start."""
    if not nodes:
        return nodes
    latest = max(nodes, key=lambda n: n.started)
    return [n for n in nodes if n.node_rank < max(latest.nnodes, 1)]


@dataclass
class Job:
    """A job as its supervisors registered it: one JobInfo per node."""

    job: str
    nodes: list[pb.JobInfo] = field(default_factory=list)

    @property
    def replicas(self) -> list[str]:
        names = {r for node in self.nodes for r in node.replicas}
        return sorted(names, key=S.replica_order)

    @property
    def finished(self) -> bool:
        return all(n.finished for n in self.nodes)

    @property
    def exit_code(self) -> int:
        return max((n.exit_code for n in self.nodes), default=0)

    @property
    def lost(self) -> bool:
        """No supervisor of the job has sent a heartbeat lately, nor said it finished."""
        newest = max((n.heartbeat for n in self.nodes), default=0.0)
        return not self.finished and time.time() - newest > S.LOST_AFTER_SECONDS

    @property
    def state(self) -> str:
        if self.finished:
            return "exited 0" if self.exit_code == 0 else f"failed: {self.exit_code}"
        if self.lost:
            return "lost"
        hung = sorted({r for node in self.nodes for r in node.hung})
        return f"running, {', '.join(hung)} hung" if hung else "running"


@dataclass
class Result:
    """What became of one change on one replica: only ever its own answer."""

    job: str
    replica: str
    name: str
    requested: Any
    change_id: str = ""
    at_step: int = 0
    revision: int = 0
    outcome: pb.Outcome | None = None
    latency: float | None = None
    started: float = 0.0
    kind: int = pb.SET
    # Why it was not sent: the replica is not running ("exited 0 at step 3000").
    not_running: str = ""
    # A change of several parameters: each one's name -> the value asked (`name` and
    # `requested` are the first's); and each key's revision once written.
    together: dict[str, Any] = field(default_factory=dict)
    revisions: dict[str, int] = field(default_factory=dict)

    @property
    def state(self) -> str:
        if self.not_running:
            return "not running"
        if self.outcome is None:
            return "timed out"
        return state_word(self.outcome)

    def sentence(self) -> str:
        """This answer in words, as every view shows it (loomrun.outcomes.sentence)."""
        if self.outcome is not None:
            return outcome_sentence(self.outcome)
        reason = f"{self.replica} is not running ({self.not_running})" if self.not_running else ""
        parts = [(name, None, value) for name, value in self.together.items()] or None
        return sentence(
            self.name, self.state, new=self.requested, reason=reason, replica=self.replica,
            parts=parts,
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job": self.job,
            "replica": self.replica,
            "name": self.name,
            "state": self.state,
            "requested": self.requested,
            "change_id": self.change_id,
            "kind": kind_word(self.kind),
        }
        if self.not_running:
            out["reason"] = f"not running: {self.not_running}"
        if self.at_step:
            out["at_step"] = self.at_step
        if self.outcome is not None:
            out.update(
                old=P.from_pb(self.outcome.old) if self.outcome.HasField("old") else None,
                new=P.from_pb(self.outcome.new),
                step=self.outcome.step,
                reason=self.outcome.reason or None,
                latency_ms=round(self.latency * 1000, 3) if self.latency is not None else None,
            )
        if self.together:  # one change of several parameters: each one's values
            answered = {p.name: p for p in self.outcome.parts} if self.outcome else {}

            out["parts"] = [
                {"name": name, "requested": asked, "old": P.from_field(part, "old"),
                 "new": P.from_field(part, "new")}
                for name, asked in self.together.items()
                for part in [answered.get(name, pb.Part())]
            ]  # fmt: skip
        return out


@dataclass
class ReplicaSchema:
    """What one replica published: its parameters, and the process group it trains in."""

    specs: dict[str, P.ParamSpec]
    group_size: int = 0


def superseded(result: Result, newer: pb.Outcome | None) -> pb.Outcome:
    """The answer of a change that a newer change to one of its keys overtook."""
    parts = {}
    for name, asked in (result.together or {result.name: result.requested}).items():
        want = pb.DesiredParam(
            change_id=result.change_id, revision=result.revision, kind=result.kind
        )
        if asked is not None:
            want.value.CopyFrom(P.to_pb(asked))
        parts[name] = want
    step = newer.step if newer is not None else 0
    return answer_change(parts, pb.SUPERSEDED, step, OVERTAKEN, result.replica)


def summary(results: list[Result]) -> str:
    """What a change came to over its replicas: applied only when every one applied it."""
    states = {r.state for r in results}
    if "timed out" in states:
        return "timed out"
    if states != {"applied"}:
        order = ("rejected", "overridden", "missed", "superseded", "not running")
        return next((s for s in order if s in states), "applied")
    return "applied"


def how_it_ended(status: pb.ReplicaStatus) -> str:
    """A replica that runs no more, in a few words: "exited 0 at step 3000"."""
    word = ENDED.get(status.state, "ended")
    code = f" {status.exit_code}" if status.state != pb.STOPPED else ""
    return f"{word}{code} at step {status.status.step}"


def parameters(
    replica: str,
    specs: dict[str, P.ParamSpec],
    status: pb.Status | None,
    outcomes: dict[tuple[str, str], pb.Outcome],
) -> list[dict[str, Any]]:
    """One replica's parameters as `get` and the page list them: the value in effect, the
    script's own (its current value, which `unset` goes back to), whether loomrun steers
    it and holds it, and its last change."""
    values = status.values if status is not None else {}
    own_values = status.own if status is not None else {}
    held = set(status.held) if status is not None else set()
    by_field = _field_changes(replica, specs, outcomes)
    listing = []
    for spec in specs.values():
        last = outcomes.get((replica, spec.name))
        field = by_field.get(spec.name)
        if field is not None and (last is None or field[1].time > last.time):
            path, last = field
        else:
            path = spec.name
        applied = last is not None and last.state == pb.APPLIED and not last.ended
        since = applied and (status is None or last.time > status.time)
        value = P.from_pb(values[spec.name]) if spec.name in values else spec.default
        if since and last.new.WhichOneof("kind"):  # applied since the last status
            new = P.from_pb(last.new)
            if path == spec.name:
                value = new
            else:  # a field of it: in the value as the status has it
                with contextlib.suppress(P.ParamError):
                    value = fields.patched(spec, value, fields.split(path)[1], new)
        if spec.builtin:  # the optimizer's: the worker says what it steers
            steered = spec.name in own_values
            own = P.from_pb(own_values[spec.name]) if steered else value
            if since:
                steered = last.kind != pb.UNSET
        else:
            own = spec.default
            steered = applied and last.kind != pb.UNSET and own is not None and value != own
        bounds = [f"{k} {v:g}" for k, v in (("min", spec.min), ("max", spec.max)) if v is not None]
        listing.append(
            {
                "replica": replica,
                "name": spec.name,
                "type": spec.type_name,
                "bounds": ", ".join(bounds),
                "builtin": spec.builtin,
                "doc": spec.doc,
                "value": value,
                "own": own,
                "steered": steered,
                "held": spec.name in held and steered,
                "changed_at_step": last.step if applied else None,
                "changed_at": last.time if applied else None,
            }
        )
    return listing


def _field_changes(replica: str, specs: dict, outcomes: dict) -> dict[str, tuple[str, pb.Outcome]]:
    """By structured parameter: the latest answer to a change of one of its fields
    (`sched/warmup`), and that field's path."""
    if not any(spec.structured for spec in specs.values()):
        return {}
    latest: dict[str, tuple[str, pb.Outcome]] = {}
    for (where, path), outcome in outcomes.items():
        if where != replica or "/" not in path:
            continue
        base = fields.base(path)
        if base not in latest or outcome.time > latest[base][1].time:
            latest[base] = (path, outcome)
    return latest


def with_ended(job, results, ended: dict[str, str], names, kind) -> list[Result]:
    """The results of the targets that run no more: not sent, and how each ended (one per
    replica: the change is one, however many parameters it has)."""
    asked = dict(names) if isinstance(names, dict) else dict.fromkeys(names)
    first = min(asked)
    together = dict(sorted(asked.items())) if len(asked) > 1 else {}
    for replica, how in ended.items():
        results.append(
            Result(job, replica, first, asked[first], kind=kind, not_running=how, together=together)
        )
    return results
