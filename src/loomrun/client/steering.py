"""Steering: one connection to the broker, the queries of a job's state on it, and the
changes (set, unset, pause), each checked before it is written and waited on for every
replica's own answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from google.protobuf.message import DecodeError

from loomrun import buckets, fields
from loomrun import params as P
from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.broker.connect import BrokerOptions, connect_client
from loomrun.client.checks import check, check_hold, whole_process_groups
from loomrun.client.correlator import Correlator
from loomrun.client.model import (
    ENDED,
    NEVER_USED,
    Job,
    ReplicaSchema,
    Result,
    SteerError,
    how_it_ended,
    origin,
    suggest,
    this_run,
    with_ended,
)
from loomrun.rulebook import MOST_RULES


class Steering:
    """A connection to the broker and the job state on it: the queries (jobs, schemas,
    statuses, outcomes, the ledger, the metric history), the checks of a change, and
    set, unset and pause, whose answers the Correlator waits for."""

    def __init__(self, nc):
        self.nc = nc
        self._js = None
        self._kv: dict[str, Any] = {}
        # A long-lived client (the Python API) reads the schemas once; a missing name or
        # replica makes it read them again, since workers declare parameters as they go.
        self._schemas: dict[str, dict[str, ReplicaSchema]] = {}
        self._jobs: dict[str, tuple[Job, float]] = {}  # job -> (it, when it was read)
        self.job_ttl = 1.0
        self.correlator = Correlator(nc)

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

    async def schemas(self, job: str, fresh: bool = True) -> dict[str, ReplicaSchema]:
        """What every replica of the job published (a replica that has not yet is absent)."""
        if not fresh and job in self._schemas:
            return self._schemas[job]
        found = {}
        for key, data in (await self.entries(S.STATE, S.schema(job))).items():
            replica = S.replica_of(key)
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
        for key, data in (await self.entries(S.STATUS, S.status(job))).items():
            with contextlib.suppress(DecodeError):
                out[S.replica_of(key)] = pb.ReplicaStatus.FromString(data)
        return out

    def ledger(self, job: str, follow: bool = False):
        """The job's change ledger from the broker, oldest first (see client.ledger)."""
        from loomrun.client.ledger import ledger

        return ledger(self.nc, self.js, job, follow)

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
        for key, data in (await self.entries(S.STATE, S.outcome(job))).items():
            with contextlib.suppress(DecodeError):
                out[S.split_outcome(key)] = pb.Outcome.FromString(data)
        return out

    async def check(
        self, job: str, replicas: list[str], changes: dict[str, Any], convert: bool = True
    ) -> dict[str, dict[str, Any]]:
        """Convert and validate every change for every replica; nothing is written."""
        if S.PAUSE in changes:
            raise SteerError("pause is not a parameter: use `loomrun pause` and `loomrun resume`")
        schemas = await self.schemas(job, fresh=False)
        bases = {fields.base(name) for name in changes}
        if any(r not in schemas or not bases <= set(schemas[r].specs) for r in replicas):
            schemas = await self.schemas(job)
        return check(schemas, job, replicas, changes, convert)

    async def _whole_process_groups(self, job: Job, targets: list[str], force: bool) -> bool:
        """True when the change may go to each target at once; refuse part of a group."""
        cached = self._schemas.get(job.job, {})
        return await whole_process_groups(
            job, targets, force, cached, lambda: self.schemas(job.job)
        )

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
        if hold:
            check_hold(changes)
        found = await self.job(job)
        targets = self.targets(found, replicas)
        checked = await self.check(found.job, targets, changes)
        at_once = await self._whole_process_groups(found, targets, force)
        ended = await self._not_running(found.job, targets)
        writes = [
            (r, {name: (S.desired_param(found.job, r, name), v) for name, v in checked[r].items()})
            for r in targets
            if r not in ended
        ]
        kind = pb.HOLD if hold else pb.SET
        results = await self.correlator.write_and_wait(
            found.job, writes, at_step or 0, at_once, timeout, wait, kind
        )
        return with_ended(found.job, results, ended, changes, kind)

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
                spec = schemas[replica].specs[fields.base(name)]
                if not spec.builtin and spec.default is None:
                    raise SteerError(f"{name} of {replica} has no value of the script's own")
            if replica not in ended:
                keys = {name: (S.desired_param(found.job, replica, name), None) for name in names}
                writes.append((replica, keys))
        results = await self.correlator.write_and_wait(
            found.job, writes, 0, at_once, timeout, wait, pb.UNSET
        )
        return with_ended(found.job, results, ended, names, pb.UNSET)

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
        key = lambda r: S.desired_pause(found.job, r)  # noqa: E731
        return await self._one(found.job, targets, S.PAUSE, key, paused, at_step, at_once,
                               timeout, wait)  # fmt: skip

    async def _one(
        self, job: str, targets: list[str], name: str, key, value: Any, at_step: int | None,
        at_once: bool, timeout: float, wait: bool,
    ) -> list[Result]:  # fmt: skip
        """Write one key's change (pause, an action) to each target that runs, under
        `key(replica)`, and wait for every answer."""
        ended = await self._not_running(job, targets)
        writes = [(r, {name: (key(r), value)}) for r in targets if r not in ended]
        results = await self.correlator.write_and_wait(
            job, writes, at_step or 0, at_once, timeout, wait
        )
        return with_ended(job, results, ended, {name: value}, pb.SET)

    async def act(
        self,
        job: str | None,
        name: str,
        value: dict[str, Any],
        replicas: list[str] | None = None,
        at_step: int | None = None,
        timeout: float = 30.0,
        wait: bool = True,
        force: bool = False,
    ) -> list[Result]:
        """One action on the training state (snapshot, rollback, save; or the periodic
        snapshots' setting), done once, at one step (ranks of a group: one they agree on),
        and answered by each replica with what it did."""
        if name not in S.ACTIONS and name != S.SNAPSHOT_EVERY:
            raise SteerError(f"{name!r} is not an action of loomrun")
        found = await self.job(job)
        targets = self.targets(found, replicas)
        await self.schemas(found.job)
        at_once = await self._whole_process_groups(found, targets, force)
        schemas = self._schemas.get(found.job, {})
        if (
            name == S.ROLLBACK
            and at_once
            and any(schemas[r].group_size > 1 for r in targets if r in schemas)
        ):
            raise SteerError(
                "a rollback of some ranks of a process group would leave them different: "
                "roll back every rank of the group, without --force"
            )
        key = lambda r: S.desired_param(found.job, r, name)  # noqa: E731
        return await self._one(found.job, targets, name, key, value, at_step, at_once,
                               timeout, wait)  # fmt: skip

    async def copy(
        self, job: str | None, targets: list[str], source: str,
        values: dict[str, Any] | None = None, via: str = "auto", timeout: float = 60.0,
    ) -> list[Result]:  # fmt: skip
        """Each of `targets` takes `source`'s training state at its next step, with no
        restart, and `values` set beside it (client.copying): independent replicas only.
        `via`: shm (one host), store (the broker's object store), or auto."""
        from loomrun.client.copying import copy_state

        return await copy_state(self, job, targets, source, values or {}, via, timeout)

    async def snapshots(self, job: str | None) -> tuple[str, list[dict[str, Any]], dict]:
        """The snapshots every replica keeps (from their statuses): one row per name and
        step, with its size and the replicas that hold it; and each replica's periodic
        setting (every, keep)."""
        found = await self.job(job)
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        every = {}
        for replica, status in sorted((await self.statuses(found.job)).items()):
            if status.state in ENDED:
                continue
            every[replica] = (status.status.snapshot_every, status.status.snapshot_keep)
            for info in status.status.snapshots:
                row = rows.setdefault(
                    (info.name, info.step),
                    {"name": info.name, "step": info.step, "bytes": info.bytes,
                     "periodic": info.periodic, "time": info.time, "replicas": []},
                )  # fmt: skip
                row["bytes"] = max(row["bytes"], info.bytes)
                row["replicas"].append(replica)
        ordered = sorted(rows.values(), key=lambda r: (r["step"], r["name"]))
        return found.job, ordered, every

    # -- rules ---------------------------------------------------------------------------

    async def add_rule(
        self, job: str | None, name: str, when: str, then: str, cooldown: int = 0,
        across: str = "", replicas: list[str] | None = None,
    ) -> tuple[str, pb.Rule]:  # fmt: skip
        """A rule of the job (replacing one of that name), checked here as its supervisor
        reads it: it steers by itself from the next status on (control.rules)."""
        from loomrun.rulebook import read_rule
        from loomrun.rulelang import RuleError

        found = await self.job(job)
        if any(node.nnodes > 1 for node in found.nodes):
            raise SteerError(f"job {found.job} runs on several nodes: rules run on a job of one")
        targets = self.targets(found, replicas) if replicas else []
        rule = pb.Rule(name=name, when=when, then=then, cooldown=cooldown, across=across,
                       replicas=targets, origin=origin())  # fmt: skip
        try:
            read_rule(rule)
        except RuleError as error:
            raise SteerError(str(error)) from None
        held = await self.rules(found.job)
        if name not in {r.name for r in held} and len(held) >= MOST_RULES:
            raise SteerError(f"job {found.job} has {len(held)} rules, the most it may have")
        kv = await self.kv(S.DESIRED)
        await kv.put(S.rule(found.job, name), rule.SerializeToString())
        return found.job, rule

    async def rules(self, job: str) -> list[pb.Rule]:
        """The job's rules, as the bucket holds them, by name."""
        rules = []
        for data in (await self.entries(S.DESIRED, S.rule(job))).values():
            with contextlib.suppress(DecodeError):
                rules.append(pb.Rule.FromString(data))
        return sorted(rules, key=lambda r: r.name)

    async def remove_rule(self, job: str | None, name: str) -> str:
        """The rule goes; SteerError when the job has none of that name."""
        found = await self.job(job)
        held = await self.rules(found.job)
        if name not in {r.name for r in held}:
            have = ", ".join(r.name for r in held) or "none"
            raise SteerError(f"job {found.job} has no rule {name!r} (it has: {have})")
        kv = await self.kv(S.DESIRED)
        await kv.delete(S.rule(found.job, name))
        return found.job

    async def close(self) -> None:
        await self.correlator.close()
