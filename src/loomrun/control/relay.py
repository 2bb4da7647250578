"""Desired config in: the job's keys in the desired-config bucket, copied into the mailboxes.

The bucket is watched; on every reconnection the watch starts over from its current
contents, so a change made while the supervisor was away still lands. A change is known by
its id, so seeing it again (after a reconnect) changes nothing, and a store made anew
(revisions starting over) cannot make new changes look old.

Which changes were written, and which later ones replaced them, is kept by the replica's
ReplicaChanges: a replaced change that the worker never read gets its answer (superseded)
from the pump.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.broker.connect import several_filters
from loomrun.desired import MOST_TOGETHER
from loomrun.mailbox import MailboxError
from loomrun.outcomes import OVERTAKEN, answer_change
from loomrun.output import say
from loomrun.subjects import PAUSE

if TYPE_CHECKING:
    from loomrun.control.plane import ReplicaView


def together_fits(name: str, together) -> bool:
    """A change's list of its keys, as a client of loomrun writes it: sorted, each a
    parameter's name once, this key's among them."""
    names = list(together)
    return (
        1 < len(names) <= MOST_TOGETHER
        and name in names
        and names == sorted(set(names))
        and all(S.is_key(n) and n != PAUSE for n in names)
    )


class DesiredRelay:
    """Takes each change to this node's replicas off the broker into their desired state
    (ReplicaChanges) and writes it to their mailboxes; `on_written(replica, refused)` (the
    pump's) hears of each write, or of its refusal as an answer."""

    def __init__(self, job: str, replicas: dict[str, ReplicaView], link, outbox, on_written):
        self.job = job
        self.replicas = replicas
        self.link = link
        self.outbox = outbox
        self.on_written = on_written
        self.refusal = ""
        self._watcher = None
        self._mine = f"{job}."
        self.transfer = None  # control.transfer: a copy from another host is fetched first
        self._latest: dict[str, str] = {}  # a copy's key -> the change id it took last

    def subjects(self, several_filters: bool = True) -> list[str]:
        """What this node watches: its own replicas' keys only, so that on a job of many
        nodes a change to another node's replica is not delivered here at all (a watch of
        the whole job costs every node every change of every replica). A server older
        than 2.10 takes one filter only: the whole job's keys, then."""
        if not several_filters:
            return [S.kv_subject(S.DESIRED, S.job_keys(self.job))]
        return [S.kv_subject(S.DESIRED, S.replica_keys(self.job, name)) for name in self.replicas]

    async def watch(self) -> None:
        """Copy every change of this node's keys into the mailboxes, from the current
        contents on (an ordered consumer of the last value per key, as a KV watch is, but
        filtered to this node's replicas), until stopped. Raises if the broker refuses
        the watch (the caller tries again)."""
        from nats.js import api

        await self.stop()
        prefix = len(S.kv_subject(S.DESIRED, ""))

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
        changes = replica.changes
        if operation in ("DEL", "PURGE") or not data:
            self._superseded(replica, changes.delivered(name, ""))
            if changes.unwant(name):
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
        if want.together and not together_fits(name, want.together):
            say(f"ignored a desired value for {key} with a malformed list of its change's keys")
            return
        if name == S.COPY and self.transfer is not None:
            self._latest[key] = want.change_id
            if self.transfer.fetching(want):
                return  # delivered once fetched
            if self.transfer.needs_fetch(replica.name, want):

                def fetched() -> None:
                    if self._latest.get(key) == want.change_id:
                        self.take(key, operation, data, revision)
                    else:  # a later copy came meanwhile: this one is never delivered
                        self.transfer.dropped(replica.name, want)
                        self._superseded(replica, [{name: want}])

                self.transfer.fetch(replica.name, want, fetched)
                return
            want = self.transfer.annotated(want)
        want.revision = revision
        want.ClearField("base")  # the supervisor's own, never a client's
        self._superseded(replica, changes.delivered(name, want.change_id))
        parts = changes.assemble(name, want) if want.together else {name: want}
        if parts is None:
            return  # the rest of its keys are still to come
        taken = {n: changes.want(n, w) for n, w in parts.items()}
        if not any(version for version, _ in taken.values()):
            return  # the change this replica holds already (seen again after a reconnect)
        if not self.write(replica):
            for n, (version, _) in taken.items():
                if version:
                    changes.not_written(n)
            if not any(again for _, again in taken.values()):
                refused = answer_change(parts, pb.REJECTED, 0, self.refusal, replica.name)
                self.on_written(replica, refused)
            return
        for n, (version, again) in taken.items():
            if version:
                changes.written(n, parts[n].change_id, version, again)
        self.on_written(replica, None)

    def _superseded(self, replica: ReplicaView, gone: list[dict[str, pb.DesiredParam]]) -> None:
        """Changes of several keys that one of their keys moved on from before the rest
        came: never written, answered superseded."""
        for parts in gone:
            step = replica.mailbox.step[0]
            self.on_written(
                replica, answer_change(parts, pb.SUPERSEDED, step, OVERTAKEN, replica.name)
            )

    def write(self, replica: ReplicaView) -> bool:
        try:
            replica.mailbox.desired.write(replica.changes.desired.state)
        except MailboxError as error:
            self.refusal = str(error)
            say(f"{replica.name}: {error}")
            return False
        return True

    def not_applied(self, replica: ReplicaView, outcome: pb.Outcome) -> None:
        """A change applied nowhere: the mailbox holds what is in effect again."""
        if replica.changes.not_applied(outcome):
            self.write(replica)

    def rebase(self, replica: ReplicaView) -> None:
        """The replica restarts: its mailbox holds what the next worker starts from."""
        replica.changes.rebase()
        self.write(replica)
