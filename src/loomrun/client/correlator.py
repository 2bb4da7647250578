"""Writing changes and waiting for each one's own answer: the client's half of "every answer
belongs to its question".

Every outcome of a job is heard on its outcomes subject from before the first write; a
result is settled only by the answer that carries its change's id, or by news that a newer
change to the same key was applied first (then it was never read: superseded)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from google.protobuf.message import DecodeError

from loomrun import buckets
from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.client.model import NEVER_USED, Result, SteerError, origin, superseded
from loomrun.desired import change, new_change_id
from loomrun.outcomes import names_of


class Correlator:
    """Owned by a Steering: the results waiting for an answer, per (job, replica, name); a
    change of several parameters waits under each of its names."""

    def __init__(self, nc):
        self.nc = nc
        self._listening: dict[str, Any] = {}
        # (job, replica, name) -> the Results waiting for an answer to a change of that key.
        self._waiting: dict[tuple[str, str, str], list[tuple[Result, asyncio.Event]]] = {}
        # (id of a waiting Result, name) -> the newest revision applied to that key since.
        self._overtaken: dict[tuple[int, str], int] = {}

    async def listen(self, job: str) -> None:
        """Hear every outcome of the job from now on: subscribed (and flushed, so the server
        has it) before anything is written, so no answer can slip past."""
        if job in self._listening:
            return

        async def route(msg) -> None:
            try:
                outcome = pb.Outcome.FromString(msg.data)
            except DecodeError:
                return
            for name in names_of(outcome):
                for result, done in list(self._waiting.get((job, outcome.replica, name), ())):
                    if done.is_set():
                        continue
                    if result.change_id == outcome.change_id:
                        self._settle(job, result, done, outcome)
                    elif outcome.state == pb.APPLIED:
                        key = (id(result), name)
                        newest = max(self._overtaken.get(key, 0), outcome.revision)
                        self._overtaken[key] = newest
                        if self._overtaken_by(result):
                            self._settle(job, result, done, superseded(result, outcome))

        self._listening[job] = await self.nc.subscribe(S.outcomes(job), cb=route)
        await self.nc.flush()

    def _overtaken_by(self, result: Result) -> bool:
        """A newer change to one of the result's keys was applied: its revision there is
        past the result's own (known once the write returned)."""
        return any(
            revision and self._overtaken.get((id(result), name), 0) > revision
            for name, revision in result.revisions.items()
        )

    def _settle(self, job: str, result: Result, done: asyncio.Event, outcome: pb.Outcome) -> None:
        """This result's answer: its own outcome, or news that a newer change to one of its
        keys was applied first. Outcomes of one replica come in the order it answered; a
        change the replica read is always answered before a newer one is applied; so one
        that has no answer when a newer one is applied was never read, and never will be
        (the bucket's watch may skip a change that a newer one replaced before it was
        delivered). Only `applied` counts: a newer change rejected, missed or refused
        leaves the older one desired."""
        result.outcome = outcome
        result.latency = time.perf_counter() - result.started
        self._forget(job, [(result, done)])
        done.set()

    async def close(self) -> None:
        for subscription in self._listening.values():
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def write_and_wait(
        self,
        job: str,
        writes: list[tuple[str, dict[str, tuple[str, Any]]]],
        at_step: int,
        at_once: bool,
        timeout: float,
        wait: bool,
        kind: int = pb.SET,
    ) -> list[Result]:
        """Write one change (`writes`: per replica, name -> (key, value)) and wait for each
        replica's answer to it. Every key of every replica carries the one change id: the
        ranks of a group agree on it by that id, and a replica applies all of its keys at
        one step, or none."""
        if wait and writes:
            await self.listen(job)
        who, change_id = origin(), new_change_id()
        results, pending, puts, keyed = [], [], [], []
        for replica, parts in writes:
            names = sorted(parts)
            lead_key, lead_value = parts[names[0]]
            together = {name: parts[name][1] for name in names} if len(names) > 1 else {}
            result = Result(
                job, replica, names[0], lead_value, change_id, at_step, kind=kind,
                together=together,
            )  # fmt: skip
            if wait:
                done = asyncio.Event()
                for name in names:
                    self._waiting.setdefault((job, replica, name), []).append((result, done))
                pending.append((result, done))
            result.started = time.perf_counter()
            results.append(result)
            for name in names:
                key, value = parts[name]
                want = change(value, at_step, at_once, who, change_id, kind, names)
                puts.append(buckets.put(self.nc, S.DESIRED, key, want.SerializeToString()))
                keyed.append((result, name))
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
        for (result, name), revision in zip(keyed, revisions, strict=True):
            result.revisions[name] = revision
            if name == result.name:
                result.revision = revision
        for result, done in pending:  # a newer change to one of its keys was applied already
            if not done.is_set() and self._overtaken_by(result):
                self._settle(job, result, done, superseded(result, None))
        if pending:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(d.wait() for _, d in pending)), timeout)
            self._forget(job, pending)
        return results

    def _forget(self, job: str, pending) -> None:
        for result, done in pending:
            for name in [result.name, *result.together]:
                self._overtaken.pop((id(result), name), None)
                waiting = self._waiting.get((job, result.replica, name), [])
                if (result, done) in waiting:
                    waiting.remove((result, done))
