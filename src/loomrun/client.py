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
import math
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from loomrun import params as P
from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.broker import BrokerOptions, connect_client

# How far ahead of the slowest replica an automatic at-step lands, in seconds of its steps.
AT_STEP_LEAD = 0.3
RATE_WAIT = 2.0
BUILTIN_NAMES = {"lr", "momentum", "weight_decay", "betas"}


class SteerError(Exception):
    """A request that cannot be carried out as asked; one line for a person."""


@dataclass
class Job:
    """A job as its supervisors registered it: one JobInfo per node."""

    job: str
    nodes: list[pb.JobInfo] = field(default_factory=list)

    @property
    def replicas(self) -> list[str]:
        names = {r for node in self.nodes for r in node.replicas}
        return sorted(names, key=lambda r: int(r[1:]) if r[1:].isdigit() else 0)

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
        return "lost" if self.lost else "running"


@dataclass
class Result:
    """What became of one change on one replica."""

    job: str
    replica: str
    name: str
    requested: Any
    version: int = 0
    at_step: int = 0
    outcome: pb.Outcome | None = None
    latency: float | None = None

    @property
    def state(self) -> str:
        if self.outcome is None:
            return "timed out"
        if not self.outcome.applied:
            return "rejected"
        return "late" if self.outcome.late else "applied"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job": self.job,
            "replica": self.replica,
            "name": self.name,
            "state": self.state,
            "requested": self.requested,
            "version": self.version,
        }
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


def suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def pick_at_step(statuses: list[pb.ReplicaStatus], now: float) -> int:
    """A step every replica reaches only after the change has arrived: ahead of the slowest."""
    target = 0
    for status in statuses:
        age = max(0.0, now - status.status.time) if status.status.time else 0.0
        rate = 0.0 if status.status.paused else status.status.steps_per_sec
        ahead = math.ceil(rate * (age + AT_STEP_LEAD))
        target = max(target, status.status.step + ahead + 1)
    return target


class Steering:
    """A connection to the broker and the job state on it."""

    def __init__(self, nc):
        self.nc = nc
        self.js = nc.jetstream()
        self._kv: dict[str, Any] = {}
        # A long-lived client (the Python API) reads a replica's schema once; a missing name
        # makes it read again, since workers declare parameters as they go.
        self._schemas: dict[tuple[str, str], dict[str, P.ParamSpec]] = {}
        self._jobs: dict[str, Job] = {}
        self._outcome_watchers: dict[str, asyncio.Task] = {}
        self._waiting: dict[tuple[str, str, str], list[tuple[Result, asyncio.Event]]] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, options: BrokerOptions, timeout: float = 3.0):
        nc = await connect_client(options, timeout)
        steering = cls(nc)
        try:
            yield steering
        finally:
            await steering.close()
            with contextlib.suppress(Exception):
                await nc.close()

    async def kv(self, bucket: str):
        if bucket not in self._kv:
            from nats.js.errors import BucketNotFoundError

            try:
                self._kv[bucket] = await self.js.key_value(bucket)
            except BucketNotFoundError:
                raise SteerError("no loomrun job has ever run on this broker") from None
        return self._kv[bucket]

    async def entries(self, bucket: str, pattern: str) -> dict[str, bytes]:
        """The current value of every key matching `pattern`."""
        kv = await self.kv(bucket)
        watcher = await kv.watch(pattern, ignore_deletes=True)
        found = {}
        try:
            async for entry in watcher:
                if entry is None:
                    break
                found[entry.key] = entry.value
        finally:
            await watcher.stop()
        return found

    # -- jobs --------------------------------------------------------------------------

    async def jobs(self) -> list[Job]:
        jobs: dict[str, Job] = {}
        for data in (await self.entries(S.JOBS, ">")).values():
            try:
                info = pb.JobInfo.FromString(data)
            except DecodeError:
                continue
            jobs.setdefault(info.job, Job(info.job)).nodes.append(info)
        return sorted(jobs.values(), key=lambda j: min(n.started for n in j.nodes))

    async def job(self, job: str | None) -> Job:
        """The job named, or the only running one; otherwise an error that lists them."""
        if job in self._jobs:
            return self._jobs[job]
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
                self._jobs[job] = candidate
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

    async def schema(self, job: str, replica: str, fresh: bool = True) -> dict[str, P.ParamSpec]:
        if not fresh and (job, replica) in self._schemas:
            return self._schemas[(job, replica)]
        found = await self.entries(S.STATE, S.schema(job, replica))
        data = found.get(S.schema(job, replica))
        if data is None:
            raise SteerError(f"{replica} of {job} has not published its parameters yet")
        try:
            schema = pb.Schema.FromString(data)
            specs = {s.name: P.spec_from_pb(s) for s in schema.params}
        except (DecodeError, P.ParamError) as error:
            raise SteerError(f"{replica} of {job} published a malformed schema ({error})") from None
        self._schemas[(job, replica)] = specs
        return specs

    async def statuses(self, job: str) -> dict[str, pb.ReplicaStatus]:
        out = {}
        for key, data in (await self.entries(S.STATUS, f"{job}.*")).items():
            with contextlib.suppress(DecodeError):
                out[key.split(".", 1)[1]] = pb.ReplicaStatus.FromString(data)
        return out

    async def outcomes(self, job: str) -> dict[tuple[str, str], pb.Outcome]:
        out = {}
        for key, data in (await self.entries(S.STATE, f"{job}.*.outcome.*")).items():
            parts = key.split(".")
            with contextlib.suppress(DecodeError):
                out[(parts[1], parts[3])] = pb.Outcome.FromString(data)
        return out

    # -- changes -------------------------------------------------------------------------

    async def check(
        self, job: str, replicas: list[str], changes: dict[str, str]
    ) -> dict[str, dict[str, Any]]:
        """Convert and validate every change for every replica; nothing is written."""
        checked: dict[str, dict[str, Any]] = {}
        for replica in replicas:
            specs = await self.schema(job, replica, fresh=False)
            if not set(changes) <= set(specs):
                specs = await self.schema(job, replica)
            checked[replica] = {}
            for name, text in changes.items():
                spec = specs.get(name)
                if spec is None and name in BUILTIN_NAMES and not BUILTIN_NAMES & set(specs):
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
                try:
                    value = P.parse(spec, text) if isinstance(text, str) else P.check(spec, text)
                except P.ParamError as error:
                    raise SteerError(str(error)) from None
                checked[replica][name] = value
        return checked

    async def set(
        self,
        job: str | None,
        changes: dict[str, Any],
        replicas: list[str] | None = None,
        at_step: int | None = None,
        timeout: float = 30.0,
        wait: bool = True,
    ) -> list[Result]:
        """Check, write and (unless wait=False) wait for every replica's outcome."""
        found = await self.job(job)
        targets = self.targets(found, replicas)
        checked = await self.check(found.job, targets, changes)
        at_step = await self._common_step(found.job, targets, at_step)
        writes = {
            (r, name): (S.desired_param(found.job, r, name), value)
            for r in targets
            for name, value in checked[r].items()
        }
        return await self._write_and_wait(found.job, writes, at_step or 0, timeout, wait)

    async def pause(
        self,
        job: str | None,
        paused: bool,
        replicas: list[str] | None = None,
        at_step: int | None = None,
        timeout: float = 30.0,
        wait: bool = True,
    ) -> list[Result]:
        found = await self.job(job)
        targets = self.targets(found, replicas)
        if paused:  # resuming needs no common step: paused replicas stand still together
            at_step = await self._common_step(found.job, targets, at_step)
        writes = {(r, S.PAUSE): (S.desired_pause(found.job, r), paused) for r in targets}
        return await self._write_and_wait(found.job, writes, at_step or 0, timeout, wait)

    async def _common_step(self, job: str, targets: list[str], at_step: int | None) -> int:
        """Replicas that train together change at one step number: given, or picked here."""
        if at_step is not None or len(targets) < 2:
            return at_step or 0
        deadline = time.monotonic() + RATE_WAIT
        while True:
            statuses = [s for r, s in (await self.statuses(job)).items() if r in targets]
            unknown = [s for s in statuses if not s.status.paused and s.status.steps_per_sec <= 0]
            if (len(statuses) == len(targets) and not unknown) or time.monotonic() > deadline:
                return pick_at_step(statuses, time.time())
            await asyncio.sleep(0.1)  # a replica that just started has no step rate yet

    async def _watch_outcomes(self, job: str) -> None:
        """One watcher per job for this session: every `set` waits on it, none builds its own."""
        if job in self._outcome_watchers:
            return
        watcher = await (await self.kv(S.STATE)).watch(f"{job}.*.outcome.*")

        async def route() -> None:
            async for entry in watcher:
                if entry is None or not entry.value:
                    continue
                parts = entry.key.split(".")
                waiting = self._waiting.get((job, parts[1], parts[3])) if len(parts) == 4 else None
                if not waiting:
                    continue
                try:
                    outcome = pb.Outcome.FromString(entry.value)
                except DecodeError:
                    continue
                for result, done in list(waiting):
                    if outcome.version >= result.version:
                        result.outcome = outcome
                        result.latency = time.perf_counter() - result.latency
                        waiting.remove((result, done))
                        done.set()

        self._outcome_watchers[job] = asyncio.ensure_future(route())

    async def close(self) -> None:
        for task in self._outcome_watchers.values():
            task.cancel()

    async def _write_and_wait(
        self,
        job: str,
        writes: dict[tuple[str, str], tuple[str, Any]],
        at_step: int,
        timeout: float,
        wait: bool,
    ) -> list[Result]:
        desired = await self.kv(S.DESIRED)
        if wait:
            await self._watch_outcomes(job)
        results, pending = [], []
        for (replica, name), (key, value) in writes.items():
            result = Result(job, replica, name, value, at_step=at_step)
            want = pb.DesiredParam(at_step=at_step)
            want.value.CopyFrom(P.to_pb(value))
            done = asyncio.Event()
            if wait:  # registered before the write, so no answer can slip past
                result.latency = time.perf_counter()
                self._waiting.setdefault((job, replica, name), []).append((result, done))
                pending.append((result, done))
            result.version = await desired.put(key, want.SerializeToString())
            results.append(result)
        if pending:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(d.wait() for _, d in pending)), timeout)
            for result, done in pending:
                if result.outcome is None:
                    result.latency = None
                    waiters = self._waiting.get((job, result.replica, result.name), [])
                    if (result, done) in waiters:
                        waiters.remove((result, done))
        return results
