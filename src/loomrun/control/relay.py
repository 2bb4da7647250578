"""Desired config in: the job's keys in the desired-config bucket, copied into the mailboxes.

The bucket is watched; on every reconnection the watch starts over from its current
contents, so a change made while the supervisor was away still lands. A change is known by
its id, so seeing it again (after a reconnect) changes nothing, and a store made anew
(revisions starting over) cannot make new changes look old.

The relay also remembers which changes it wrote and which later ones replaced them: a
replaced change that the worker never read gets its answer (superseded) from the pump.
"""

from __future__ import annotations

import contextlib
from collections import deque

from google.protobuf.message import DecodeError

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.broker.connect import several_filters
from loomrun.desired import copy
from loomrun.mailbox import MailboxError
from loomrun.outcomes import answer
from loomrun.output import say
from loomrun.subjects import PAUSE

SEEN_IDS = 32  # per parameter: enough to know a change seen again
TAKEN_KEPT = 512  # per replica: the changes taken lately, to go back to the one in effect


def forget_taken(taken: dict[str, pb.DesiredParam], in_effect: set[str]) -> None:
    """Keep the TAKEN_KEPT latest changes taken, and every change in effect however old:
    a change that is not applied goes back to it (a replica steered once, then 512 times
    on other parameters, lost its first change at its next restart)."""
    older = [change_id for change_id in taken if change_id not in in_effect]
    for change_id in older[: len(taken) - TAKEN_KEPT]:
        del taken[change_id]


class Written:
    """A change written to a replica's mailbox and not answered yet."""

    __slots__ = ("want", "replaced_at")

    def __init__(self, want: pb.DesiredParam):
        self.want = want
        self.replaced_at = 0  # the desired version that replaced it, once one did


class DesiredRelay:
    def __init__(self, job: str, replicas: dict, link, outbox, on_written):
        self.job = job
        self.replicas = replicas
        self.link = link
        self.outbox = outbox
        self.on_written = on_written
        self.refusal = ""
        self._watcher = None
        self._mine = f"{job}."

    def subjects(self, several_filters: bool = True) -> list[str]:
        """What this node watches: its own replicas' keys only, so that on a job of many
        nodes a change to another node's replica is not delivered here at all (a watch of
        the whole job costs every node every change of every replica). A server older
        than 2.10 takes one filter only: the whole job's keys, then."""
        if not several_filters:
            return [f"$KV.{S.DESIRED}.{self.job}.>"]
        return [f"$KV.{S.DESIRED}.{self.job}.{name}.>" for name in self.replicas]

    async def watch(self) -> None:
        """Copy every change of this node's keys into the mailboxes, from the current
        contents on (an ordered consumer of the last value per key, as a KV watch is, but
        filtered to this node's replicas), until stopped. Raises if the broker refuses
        the watch (the caller tries again)."""
        from nats.js import api

        await self.stop()
        prefix = len(f"$KV.{S.DESIRED}.")

        async def deliver(msg) -> None:
            try:
                operation = (msg.headers or {}).get("KV-Operation")
                revision = msg.metadata.sequence.stream
                self.take(msg.subject[prefix:], operation, msg.data, revision)
            except Exception as error:  # noqa: BLE001 - one change, never the watch
                say(f"could not take the desired value {msg.subject} ({error})")

        several = several_filters(self.link.nc)
        subjects = self.subjects(several)
        config = api.ConsumerConfig(
            filter_subjects=subjects if several else None,
            filter_subject=None if several else subjects[0],
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=300.0,
        )
        self._watcher = await self.link.js.subscribe(
            subjects[0], stream=f"KV_{S.DESIRED}", cb=deliver, ordered_consumer=True,
            config=config,
        )  # fmt: skip

    async def stop(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.unsubscribe()
            self._watcher = None

    def take(self, key: str, operation: str | None, data: bytes | None, revision: int = 0) -> None:
        """One entry off the wire: anything malformed is one line, and changes nothing."""
        parsed = S.split_desired(key)
        if parsed is None or parsed[0] not in self.replicas or not key.startswith(self._mine):
            return  # another node's or job's, which the watch's filter keeps out anyway
        replica = self.replicas[parsed[0]]
        name = parsed[2] or PAUSE
        if parsed[1] == "param" and name == PAUSE:
            say(f"ignored {key}: 'pause' is loomrun's own flag, not a parameter")
            return
        if operation in ("DEL", "PURGE") or not data:
            version = replica.desired.drop(name)
            if version:
                self._replaced(replica, name, version)
                self.write(replica)
            return
        try:
            want = pb.DesiredParam.FromString(data)
        except DecodeError:
            say(f"ignored a malformed desired value for {key} (not a DesiredParam)")
            return
        if not want.change_id or len(want.change_id) > 64:
            say(f"ignored a desired value for {key} without a proper change id")
            return
        if name == PAUSE and want.value.WhichOneof("kind") != "b":
            say(f"ignored a malformed pause value for {key} (expected a boolean)")
            return
        if want.at_step < 0:
            say(f"ignored a desired value for {key} with a negative step")
            return
        want.revision = revision
        want.ClearField("base")  # the supervisor's own, never a client's
        if want.change_id in replica.not_applied:
            return  # applied nowhere: it stays out of what a restarted worker starts from
        seen = replica.seen_ids.setdefault(name, deque(maxlen=SEEN_IDS))
        again = want.change_id in seen  # put back after a missed change: answered before
        base = replica.baseline.get(name)  # a restarted worker may not have applied it yet
        if base is not None and base.change_id != want.change_id:
            want.base.CopyFrom(base)
        version = replica.desired.take(name, want)
        if not version:
            return  # the change this replica holds already (seen again after a reconnect)
        if not self.write(replica):
            replica.desired.restore(name)
            if not again:
                self.on_written(replica, self._refused(replica, want, name))
            return
        self._replaced(replica, name, version)
        replica.taken[want.change_id] = copy(replica.desired.entry(name))
        if len(replica.taken) > TAKEN_KEPT:
            forget_taken(replica.taken, set(replica.in_effect.values()))
        if not again:
            seen.append(want.change_id)
            written = Written(copy(replica.desired.entry(name)))
            replica.written.setdefault(name, {})[want.change_id] = written
        self.on_written(replica, None)

    @staticmethod
    def _replaced(replica, name: str, version: int) -> None:
        for earlier in replica.written.get(name, {}).values():
            earlier.replaced_at = earlier.replaced_at or version

    def _refused(self, replica, want: pb.DesiredParam, name: str) -> pb.Outcome:
        return answer(want, name, pb.REJECTED, reason=self.refusal, replica=replica.name)

    def write(self, replica) -> bool:
        try:
            replica.mailbox.desired.write(replica.desired.state)
        except MailboxError as error:
            self.refusal = str(error)
            say(f"{replica.name}: {error}")
            return False
        return True

    def not_applied(self, replica, outcome: pb.Outcome) -> None:
        """A change applied nowhere (missed, or rejected: the user was told so): what the
        replica wants goes back to what is in effect there (not merely to the entry before
        it, which may never have been applied), so a restarted worker does not start from
        it either."""
        name = outcome.name
        replica.not_applied.append(outcome.change_id)
        held = replica.desired.entry(name)
        if held is None or held.change_id != outcome.change_id:
            return  # a newer change stands already
        in_effect = replica.taken.get(replica.in_effect.get(name, ""))
        if in_effect is not None:
            replica.desired.take(name, in_effect)
        else:
            replica.desired.drop(name)  # nothing of ours applied: the worker keeps its own
        self.write(replica)

    def rebase(self, replica) -> None:
        """The replica restarts: it starts from what was in effect at once, and what was
        waiting still waits (see DesiredConfig.rebase)."""
        settled = set(replica.in_effect.values()) | replica.scheduled
        found = {name: replica.taken.get(cid) for name, cid in replica.in_effect.items()}
        in_effect = {name: want for name, want in found.items() if want is not None}
        # What the new worker starts from, per name: a change that comes before the worker
        # answered for the name takes it as its base (neither is lost meanwhile).
        replica.baseline = replica.desired.rebase(settled, in_effect)
        self.write(replica)
