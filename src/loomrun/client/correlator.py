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


class Correlator:
    """Owned by a Steering: the results waiting for an answer, per (job, replica, name)."""

    def __init__(self, nc):
        self.nc = nc
        self._listening: dict[str, Any] = {}
        # (job, replica, name) -> the Results waiting for an answer to a change of that key.
        self._waiting: dict[tuple[str, str, str], list[tuple[Result, asyncio.Event]]] = {}
        # id of a waiting Result -> the newest revision applied to its key since it waits.
        self._overtaken: dict[int, int] = {}

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

    async def write_and_wait(
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
            await self.listen(job)
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
