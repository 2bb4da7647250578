"""The steering client: what `loomrun set/get/pause/resume/ls` do over NATS, from Python too.

    async with Steering.connect(BrokerOptions("nats://127.0.0.1:4222")) as steering:
        results = await steering.set("train-1a2b3c", {"lr": "0.002"}, replicas=["r1"])

A change is checked against the schema the targeted replicas published before anything is
written; then it is written as desired state, and `set` waits for every replica's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import getpass
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from loomrun import buckets
from loomrun import params as P
from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.broker.connect import BrokerOptions, connect_client, several_filters
from loomrun.desired import change, new_change_id
from loomrun.outcomes import answer, kind_word, outcome_sentence, sentence, state_word

NEVER_USED = "no loomrun job has ever run on this broker"
# A replica in one of these states answers nothing: a change to it is not sent.
ENDED = {pb.EXITED: "exited", pb.FAILED: "failed", pb.STOPPED: "stopped"}


def origin() -> str:
    """Who asks, as the change's record says: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


class SteerError(Exception):
    """A request that cannot be carried out as asked; one line for a person."""


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
        return sentence(
            self.name, self.state, new=self.requested, reason=reason, replica=self.replica
        )

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
        return out


@dataclass
class ReplicaSchema:
    """What one replica published: its parameters, and the process group it trains in."""

    specs: dict[str, P.ParamSpec]
    group_size: int = 0


def superseded(result: Result, newer: pb.Outcome | None) -> pb.Outcome:
    """The answer of a change that a newer change to the same key overtook."""
    want = pb.DesiredParam(change_id=result.change_id, revision=result.revision, kind=result.kind)
    if result.requested is not None:
        want.value.CopyFrom(P.to_pb(result.requested))
    step = newer.step if newer is not None else 0
    reason = "a later change to it reached the replica first"
    return answer(want, result.name, pb.SUPERSEDED, step, reason, result.replica)


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
    listing = []
    for spec in specs.values():
        last = outcomes.get((replica, spec.name))
        applied = last is not None and last.state == pb.APPLIED and not last.ended
        since = applied and (status is None or last.time > status.time)
        if since and last.new.WhichOneof("kind"):
            value = P.from_pb(last.new)  # applied since the last status (4 times a second)
        elif spec.name in values:
            value = P.from_pb(values[spec.name])
        else:
            value = spec.default
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


def suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Steering:
    """A connection to the broker and the job state on it."""

    def __init__(self, nc):
        self.nc = nc
        self._js = None
        self._kv: dict[str, Any] = {}
        # A long-lived client (the Python API) reads the schemas once; a missing name or
        # replica makes it read them again, since workers declare parameters as they go.
        self._schemas: dict[str, dict[str, ReplicaSchema]] = {}
        self._jobs: dict[str, tuple[Job, float]] = {}  # job -> (it, when it was read)
        self.job_ttl = 1.0
        self._listening: dict[str, Any] = {}
        # (job, replica, name) -> the Results waiting for an answer to a change of that key.
        self._waiting: dict[tuple[str, str, str], list[tuple[Result, asyncio.Event]]] = {}
        # id of a waiting Result -> the newest revision applied to its key since it waits.
        self._overtaken: dict[int, int] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, options: BrokerOptions, timeout: float = 3.0, reconnect: bool = False):
        nc = await connect_client(options, timeout, reconnect)
        steering = cls(nc)
        try:
            yield steering
        finally:
            await steering.close()
            with contextlib.suppress(Exception):
                await nc.close()

    @property
    def js(self):
        """nats-py's JetStream, for what a command never does (watching, the ledger)."""
        if self._js is None:
            self._js = self.nc.jetstream()
        return self._js

    async def kv(self, bucket: str):
        if bucket not in self._kv:
            from nats.js.errors import BucketNotFoundError

            try:
                self._kv[bucket] = await self.js.key_value(bucket)
            except BucketNotFoundError:
                raise SteerError(NEVER_USED) from None
        return self._kv[bucket]

    async def entries(self, bucket: str, pattern: str) -> dict[str, bytes]:
        """The current value of every key matching `pattern` (see buckets.snapshot)."""
        try:
            return await buckets.snapshot(self.nc, bucket, pattern)
        except buckets.BucketMissing:
            raise SteerError(NEVER_USED) from None
        except buckets.BucketError as error:
            raise SteerError(str(error)) from None

    # -- jobs --------------------------------------------------------------------------

    async def jobs(self) -> list[Job]:
        jobs: dict[str, Job] = {}
        for data in (await self.entries(S.JOBS, ">")).values():
            try:
                info = pb.JobInfo.FromString(data)
            except DecodeError:
                continue
            jobs.setdefault(info.job, Job(info.job)).nodes.append(info)
        for found in jobs.values():
            found.nodes = this_run(found.nodes)
        return sorted(jobs.values(), key=lambda j: min(n.started for n in j.nodes))

    async def job(self, job: str | None) -> Job:
        """The job named, or the only running one; otherwise an error that lists them.
        A job is read again after `job_ttl` seconds: a node may have joined it."""
        cached = self._jobs.get(job)
        if cached is not None and time.monotonic() - cached[1] < self.job_ttl:
            return cached[0]
        jobs = await self.jobs()
        running = [j for j in jobs if not j.lost and not j.finished]
        if job is None:
            if len(running) == 1:
                return running[0]
            if not running:
                raise SteerError("no loomrun job is running on this broker")
            names = ", ".join(j.job for j in running)
            raise SteerError(f"{len(running)} jobs are running ({names}): choose one with --job")
        for candidate in jobs:
            if candidate.job == job:
                self._jobs[job] = (candidate, time.monotonic())
                return candidate
        known = [j.job for j in running]
        listing = f"running: {', '.join(known)}" if known else "no job is running"
        raise SteerError(f"no job {job!r} on this broker{suggest(job, known)}; {listing}")

    def targets(self, job: Job, replicas: list[str] | None) -> list[str]:
        if not replicas:
            return job.replicas
        unknown = [r for r in replicas if r not in job.replicas]
        if unknown:
            raise SteerError(
                f"job {job.job} has no replica {unknown[0]!r}{suggest(unknown[0], job.replicas)} "
                f"(it has {', '.join(job.replicas)})"
            )
        return list(dict.fromkeys(replicas))

    # -- state of replicas ---------------------------------------------------------------

    async def schemas(self, job: str, fresh: bool = True) -> dict[str, ReplicaSchema]:
        """What every replica of the job published (a replica that has not yet is absent)."""
        if not fresh and job in self._schemas:
            return self._schemas[job]
        found = {}
        for key, data in (await self.entries(S.STATE, f"{job}.*.schema")).items():
            replica = key.split(".")[1]
            try:
                schema = pb.Schema.FromString(data)
                specs = {s.name: P.spec_from_pb(s) for s in schema.params}
            except (DecodeError, P.ParamError) as error:
                raise SteerError(
                    f"{replica} of {job} published a malformed schema ({error})"
                ) from None
            found[replica] = ReplicaSchema(specs, schema.group_size)
        self._schemas[job] = found
        return found

    async def schema(self, job: str, replica: str) -> dict[str, P.ParamSpec]:
        found = (await self.schemas(job)).get(replica)
        if found is None:
            raise SteerError(f"{replica} of {job} has not published its parameters yet")
        return found.specs

    async def statuses(self, job: str) -> dict[str, pb.ReplicaStatus]:
        out = {}
        for key, data in (await self.entries(S.STATUS, f"{job}.*")).items():
            with contextlib.suppress(DecodeError):
                out[key.split(".", 1)[1]] = pb.ReplicaStatus.FromString(data)
        return out

    async def ledger(self, job: str, follow: bool = False):
        """The job's change ledger from the broker, oldest first; with `follow`, then each new
        record as it comes. Yields Outcome records (the job is in their subject)."""
        from nats.js import api

        subjects = [S.ledger(job, "*")]
        with contextlib.suppress(Exception):  # a stream an earlier loomrun made: its records
            stream = await self.js.stream_info(S.LEDGER_STREAM)
            if several_filters(self.nc) and S.LEDGER_BEFORE in stream.config.subjects:
                subjects.append(S.ledger_before(job))
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.ALL,
            filter_subjects=subjects if len(subjects) > 1 else None,
            filter_subject=None if len(subjects) > 1 else subjects[0],
        )
        try:
            subscription = await self.js.subscribe(
                subjects[0], stream=S.LEDGER_STREAM, ordered_consumer=True, config=config
            )
        except Exception:  # noqa: BLE001 - no ledger stream on this broker yet
            return
        try:
            info = await subscription.consumer_info()
            # Nothing left, nor delivered yet: none at all. Its delivery count, not the
            # stream sequence it delivered up to, which a purge moves past 0.
            if info.num_pending == 0 and not info.delivered.consumer_seq and not follow:
                return
            async for msg in subscription.messages:
                with contextlib.suppress(DecodeError):
                    yield pb.Outcome.FromString(msg.data)
                if not follow and msg.metadata.num_pending == 0:
                    return
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def history(
        self, job: str, replicas: list[str], timeout: float = 3.0
    ) -> dict[str, pb.MetricSeries]:
        """Each replica's metric history, from its supervisor while the job runs; a replica
        whose supervisor does not answer (the job ended) is left out."""
        from nats.errors import Error as NatsError

        async def ask(replica: str) -> pb.MetricSeries | None:
            try:
                reply = await self.nc.request(S.history(job, replica), b"", timeout=timeout)
                return pb.MetricSeries.FromString(reply.data)
            except (NatsError, asyncio.TimeoutError, DecodeError):
                return None

        found = await asyncio.gather(*(ask(r) for r in replicas))
        return {r: series for r, series in zip(replicas, found, strict=True) if series is not None}

    async def outcomes(self, job: str) -> dict[tuple[str, str], pb.Outcome]:
        out = {}
        for key, data in (await self.entries(S.STATE, f"{job}.*.outcome.>")).items():
            parts = key.split(".", 3)
            with contextlib.suppress(DecodeError):
                out[(parts[1], parts[3])] = pb.Outcome.FromString(data)
        return out

    # -- changes -------------------------------------------------------------------------

    async def check(
        self, job: str, replicas: list[str], changes: dict[str, Any], convert: bool = True
    ) -> dict[str, dict[str, Any]]:
        """Convert and validate every change for every replica; nothing is written. With
        `convert=False`, only that every replica has every parameter."""
        if S.PAUSE in changes:
            raise SteerError("pause is not a parameter: use `loomrun pause` and `loomrun resume`")
        schemas = await self.schemas(job, fresh=False)
        if any(r not in schemas or not set(changes) <= set(schemas[r].specs) for r in replicas):
            schemas = await self.schemas(job)
        checked: dict[str, dict[str, Any]] = {}
        for replica in replicas:
            if replica not in schemas:
                raise SteerError(f"{replica} of {job} has not published its parameters yet")
            specs = schemas[replica].specs
            checked[replica] = {}
            for name, text in changes.items():
                spec = specs.get(name)
                if spec is None and name in P.BUILTINS and not P.BUILTINS.keys() & set(specs):
                    raise SteerError(
                        f"{replica} has no optimizer yet: {name} appears with its first "
                        "optimizer step; try again in a moment"
                    )
                if spec is None:
                    known = sorted(specs)
                    raise SteerError(
                        f"{replica} has no parameter {name!r}{suggest(name, known)}; "
                        f"it has: {', '.join(known) or 'none'}"
                    )
                if not convert:
                    continue
                try:
                    value = P.parse(spec, text) if isinstance(text, str) else P.check(spec, text)
                except P.ParamError as error:
                    raise SteerError(str(error)) from None
                checked[replica][name] = value
        return checked

    async def _whole_process_groups(self, job: Job, targets: list[str], force: bool) -> bool:
        """True when the change may go to each target at once; refuse part of a group.

        Ranks that train together take a change together (the workers agree in band on the
        step); a change to only some of them would make them differ, or hang a collective.
        """
        left_out = [r for r in job.replicas if r not in targets]
        schemas = self._schemas.get(job.job, {})
        if not left_out:  # every rank the broker knows; the schemas tell the group's size

            def size(found) -> int:
                return max((found[r].group_size for r in targets if r in found), default=1)

            if size(schemas) <= len(job.replicas):
                return False
            schemas = await self.schemas(job.job)  # a cached one may be an earlier run's
            if size(schemas) <= len(job.replicas):
                return False
            if not force:  # a node's record is not on the broker (yet)
                raise SteerError(
                    f"{', '.join(targets)} train in one process group of {size(schemas)} ranks, "
                    f"of which only {len(job.replicas)} are registered on the broker (a node "
                    "not connected yet?): the change would wait for ranks it cannot reach; "
                    "try again, or --force"
                )
            return True
        if not any(s.group_size > 1 for s in schemas.values()):
            schemas = await self.schemas(job.job)  # a cached schema may predate the group
        grouped = [r for r in targets if schemas.get(r) and schemas[r].group_size > 1]
        if not grouped:
            return False
        size = schemas[grouped[0]].group_size
        if not force:
            verb = "trains" if len(grouped) == 1 else "train"
            raise SteerError(
                f"{', '.join(grouped)} {verb} in one process group of {size} ranks with "
                f"{', '.join(left_out)}: changing only some ranks would make them differ "
                "(or hang their collectives); target all of them, or pass --force"
            )
        return True

    async def set(
        self,
        job: str | None,
        changes: dict[str, Any],
        replicas: list[str] | None = None,
        at_step: int | None = None,
        timeout: float = 30.0,
        wait: bool = True,
        force: bool = False,
        hold: bool = False,
    ) -> list[Result]:
        """Check, write and (unless wait=False) wait for every replica's own answer. With
        `hold`, lr stays at exactly the value whatever the script's schedule says."""
        not_lr = [name for name in changes if name != "lr" and not name.startswith("lr.")]
        if hold and not_lr:
            raise SteerError(
                f"--hold is for lr and lr.N (it keeps lr off the script's schedule); "
                f"{not_lr[0]} keeps exactly the value set without it"
            )
        found = await self.job(job)
        targets = self.targets(found, replicas)
        checked = await self.check(found.job, targets, changes)
        at_once = await self._whole_process_groups(found, targets, force)
        ended = await self._not_running(found.job, targets)
        writes = [
            (r, name, S.desired_param(found.job, r, name), value)
            for r in targets
            if r not in ended
            for name, value in checked[r].items()
        ]
        kind = pb.HOLD if hold else pb.SET
        results = await self._write_and_wait(
            found.job, writes, at_step or 0, at_once, timeout, wait, kind
        )
        return self._with_ended(found.job, results, ended, changes, kind)

    async def _not_running(self, job: str, targets: list[str]) -> dict[str, str]:
        """The targets that run no more, and how each ended: no change is sent to them (no
        worker would answer it, and nothing of an earlier run may answer for it)."""
        try:
            statuses = await self.statuses(job)
        except SteerError:  # no status kept yet (a broker started anew): none known ended
            return {}
        return {
            r: how_it_ended(statuses[r])
            for r in targets
            if r in statuses and statuses[r].state in ENDED
        }

    @staticmethod
    def _with_ended(job, results, ended: dict[str, str], names, kind) -> list[Result]:
        for replica, how in ended.items():
            for name in names:
                requested = names[name] if isinstance(names, dict) else None
                results.append(Result(job, replica, name, requested, kind=kind, not_running=how))
        return results

    async def unset(
        self,
        job: str | None,
        names: list[str],
        replicas: list[str] | None = None,
        timeout: float = 30.0,
        wait: bool = True,
        force: bool = False,
    ) -> list[Result]:
        """Each parameter back to the script: an optimizer's value to what the script's own
        schedule computes from the step it lands at (unscaled), a declared one to its
        default. Through the same acknowledged path as `set`."""
        found = await self.job(job)
        targets = self.targets(found, replicas)
        await self.check(found.job, targets, dict.fromkeys(names, None), convert=False)
        schemas = self._schemas[found.job]
        at_once = await self._whole_process_groups(found, targets, force)
        ended = await self._not_running(found.job, targets)
        writes = []
        for replica in targets:
            for name in names:
                spec = schemas[replica].specs[name]
                if not spec.builtin and spec.default is None:
                    raise SteerError(f"{name} of {replica} has no value of the script's own")
                if replica not in ended:
                    key = S.desired_param(found.job, replica, name)
                    writes.append((replica, name, key, None))
        results = await self._write_and_wait(found.job, writes, 0, at_once, timeout, wait, pb.UNSET)
        return self._with_ended(found.job, results, ended, names, pb.UNSET)

    async def pause(
        self,
        job: str | None,
        paused: bool,
        replicas: list[str] | None = None,
        at_step: int | None = None,
        timeout: float = 30.0,
        wait: bool = True,
        force: bool = False,
    ) -> list[Result]:
        """Pause (or resume) replicas between two steps; ranks of a group at one step."""
        found = await self.job(job)
        targets = self.targets(found, replicas)
        await self.schemas(found.job)
        # Resuming needs no agreement: paused ranks all stand at one step already.
        at_once = await self._whole_process_groups(found, targets, force) or not paused
        ended = await self._not_running(found.job, targets)
        writes = [
            (r, S.PAUSE, S.desired_pause(found.job, r), paused) for r in targets if r not in ended
        ]
        results = await self._write_and_wait(
            found.job, writes, at_step or 0, at_once, timeout, wait
        )
        return self._with_ended(found.job, results, ended, {S.PAUSE: paused}, pb.SET)

    async def _listen(self, job: str) -> None:
        """Hear every outcome of the job from now on: subscribed (and flushed, so the server
        has it) before anything is written, so no answer can slip past."""
        if job in self._listening:
            return

        async def route(msg) -> None:
            try:
                outcome = pb.Outcome.FromString(msg.data)
            except DecodeError:
                return
            key = (job, outcome.replica, outcome.name)
            for result, done in list(self._waiting.get(key, ())):
                if result.change_id == outcome.change_id:
                    self._settle(key, result, done, outcome)
                elif outcome.state == pb.APPLIED:
                    newest = max(self._overtaken.get(id(result), 0), outcome.revision)
                    self._overtaken[id(result)] = newest
                    if result.revision and newest > result.revision:
                        self._settle(key, result, done, superseded(result, outcome))

        self._listening[job] = await self.nc.subscribe(S.outcomes(job), cb=route)
        await self.nc.flush()

    def _settle(self, key, result: Result, done: asyncio.Event, outcome: pb.Outcome) -> None:
        """This result's answer: its own outcome, or news that a newer change to the same
        key was applied first. Outcomes of one replica come in the order it answered; a
        change the replica read is always answered before a newer one is applied; so one
        that has no answer when a newer one is applied was never read, and never will be
        (the bucket's watch may skip a change that a newer one replaced before it was
        delivered). Only `applied` counts: a newer change rejected, missed or refused
        leaves the older one desired."""
        self._overtaken.pop(id(result), None)
        result.outcome = outcome
        result.latency = time.perf_counter() - result.started
        self._waiting[key].remove((result, done))
        done.set()

    async def close(self) -> None:
        for subscription in self._listening.values():
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _write_and_wait(
        self,
        job: str,
        writes: list[tuple[str, str, str, Any]],
        at_step: int,
        at_once: bool,
        timeout: float,
        wait: bool,
        kind: int = pb.SET,
    ) -> list[Result]:
        if wait and writes:
            await self._listen(job)
        who = origin()
        ids = {name: new_change_id() for _, name, _, _ in writes}
        results, pending, puts = [], [], []
        for replica, name, key, value in writes:
            want = change(value, at_step, at_once, who, ids[name], kind)
            result = Result(job, replica, name, value, want.change_id, at_step, kind=kind)
            if wait:
                done = asyncio.Event()
                self._waiting.setdefault((job, replica, name), []).append((result, done))
                pending.append((result, done))
            result.started = time.perf_counter()
            results.append(result)
            puts.append(buckets.put(self.nc, S.DESIRED, key, want.SerializeToString()))
        try:
            revisions = await asyncio.gather(*puts)
        except buckets.BucketMissing:
            self._forget(job, pending)
            raise SteerError(NEVER_USED) from None
        except Exception as error:  # noqa: BLE001 - one sentence for the person asking
            self._forget(job, pending)
            raise SteerError(
                f"could not write the change to the broker ({error or type(error).__name__}); "
                "some replicas may have it: check with `loomrun get`"
            ) from None
        for result, revision in zip(results, revisions, strict=True):
            result.revision = revision
        for result, done in pending:  # a newer change to its key was applied already
            key = (job, result.replica, result.name)
            if not done.is_set() and self._overtaken.get(id(result), 0) > result.revision:
                self._settle(key, result, done, superseded(result, None))
        if pending:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(d.wait() for _, d in pending)), timeout)
            self._forget(job, pending)
        return results

    def _forget(self, job: str, pending) -> None:
        for result, done in pending:
            self._overtaken.pop(id(result), None)
            waiting = self._waiting.get((job, result.replica, result.name), [])
            if (result, done) in waiting:
                waiting.remove((result, done))
