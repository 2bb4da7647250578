"""The mailboxes out: each worker's outcomes, schema and status, published.

Outcomes go out each exactly once, in the order the worker answered (a share for another
host: once its state is in the object store, control.transfer), on the job's outcomes
subject (a `set` waits there for its own change's id) and as the latest per parameter for
`get`. A change the relay replaced before the worker read it is answered here: superseded.
Status goes out when the worker wrote one, and at least every heartbeat while the replica
lives, so a replica in a long step still shows as alive; the step counter comes from the
mailbox header, which the worker bumps at every step.

The mailboxes are polled fast only while a written change is unanswered (a `set` is waiting
on it): a busy spin for SPIN_FOR, since most changes land within a step and asyncio cannot
sleep less than 1 ms; then every FAST_POLL, up to FAST_POLL_FOR. A mailbox slot caught
mid-write is read again on the next round, never spun on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.mailbox import MailboxError
from loomrun.outcomes import answer_change, names_of, outcome_sentence, part_of, state_word
from loomrun.output import say
from loomrun.replay import ORIGIN as REPLAYED

STATUS_PUBLISH_INTERVAL = 0.25
HEARTBEAT_INTERVAL = 1.0
TELEMETRY_INTERVAL = 1.0
SPIN_FOR = 0.005
SPIN_SHARE = 0.2  # at most this share of a core spent spinning, in a flood of changes
SPIN_WINDOW = 0.1
FAST_POLL = 0.001
SLOW_POLL = 0.02
FAST_POLL_FOR = 2.0
LIVE = (pb.STARTING, pb.RUNNING, pb.PAUSED, pb.HUNG)
# Answers that leave what is in effect as it was (a change of several keys superseded may
# leave some of them desired: they go back too).
NOT_APPLIED = (pb.MISSED, pb.REJECTED, pb.SUPERSEDED)
SEQ_AHEAD = 1 << 20  # answers a worker could give between two reads of its mailbox, at most


class MailboxPump:
    def __init__(self, job: str, host: str, replicas: dict, outbox, devices, events):
        self.job = job
        self.host = host
        self.replicas = replicas
        self.outbox = outbox
        self.devices = devices
        self.events = events
        self.on_not_applied = None  # the relay's: a change applied nowhere is not wanted
        self._said_malformed: set[str] = set()
        self.ledger = None  # the change ledger: every answer, recorded
        self.history = None  # the metric history: a point per status published, at most
        self.on_status = None  # the rules': each status the worker wrote, as read
        self.reads_every_status = None  # the rules': whether they want every status
        self.on_answer = None  # the rules': each answer
        self.transfer = None  # control.transfer: a share for another host goes out first
        self._written = asyncio.Event()
        self._spin_until = 0.0
        self._window = (0.0, 0.0)  # (start, seconds spun since): the spinning budget
        self._fast_until = 0.0

    def written(self, replica, refused: pb.Outcome | None) -> None:
        """The relay wrote a change (poll fast for its answer), or refused to (answer now)."""
        if refused is not None:
            if self.transfer is not None:
                self.transfer.answered(replica.name, refused)
            self._publish_outcome(replica, refused)
            if self.on_answer is not None:
                self.on_answer(replica.name, refused)
            return
        now = time.monotonic()
        self._spin_until = now + SPIN_FOR
        self._fast_until = now + FAST_POLL_FOR
        self._written.set()

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            for replica in self.replicas.values():
                try:
                    self.read_back(replica, now)
                except MailboxError as error:
                    say(f"{replica.name}: {error}")
            waiting = any(r.changes.waiting() for r in self.replicas.values())
            if waiting and now < self._fast_until:
                spin = now < self._spin_until and self._may_spin(now)
                await asyncio.sleep(0 if spin else FAST_POLL)
                if spin:
                    start, spun = self._window
                    self._window = (start, spun + time.monotonic() - now)
                continue
            self._written.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._written.wait(), SLOW_POLL)

    def _may_spin(self, now: float) -> bool:
        """Spinning answers a change within microseconds, but a flood of changes must not
        take a core from training: at most SPIN_SHARE of each SPIN_WINDOW is spent so."""
        start, spun = self._window
        if now - start >= SPIN_WINDOW:
            self._window = (now, 0.0)
            return True
        return spun < SPIN_SHARE * SPIN_WINDOW

    def read_back(self, replica, now: float, final: bool = False) -> None:
        box = replica.mailbox
        if box.acks.seq[0] != replica.seen["acks"]:
            found = box.acks.try_read()
            if found is not None:
                replica.seen["acks"] = found[0]
                if found[1] is not None:
                    self._take_acks(replica, found[1])
        if box.schema.seq[0] != replica.seen["schema"]:
            found = box.schema.try_read()
            if found is not None:
                replica.seen["schema"] = found[0]
                if found[1] is not None:
                    replica.schema = found[1]
                    self.outbox.put(S.STATE, S.schema(self.job, replica.name), found[1])
        fresh = box.status.seq[0] != replica.seen["status"]
        due = final or now >= replica.next_status
        if fresh and (due or (self.reads_every_status is not None and self.reads_every_status())):
            found = box.status.try_read()
            if found is not None:
                replica.seen["status"] = box.status_read[0] = found[0]
                if found[1] is not None:
                    replica.status, replica.unpublished = found[1], True
                    replica.worker_reported(found[1])  # a status written: not hung
                    if self.on_status is not None:
                        self.on_status(replica.name, found[1])
        if replica.unpublished and (final or now >= replica.next_status):
            replica.unpublished = False
            if self.history is not None:
                self.history.add(replica.name, replica.status)
            self.publish_status(replica)
            return
        if replica.state in LIVE and now >= replica.heartbeat:
            self.publish_status(replica)

    def _take_acks(self, replica, acks: pb.Acks) -> None:
        for outcome in acks.recent:
            if outcome.seq <= replica.outcome_seq:
                continue
            far = outcome.seq > replica.outcome_seq + SEQ_AHEAD
            names = [outcome.name, *(part.name for part in outcome.parts)]
            if far or not all(S.is_key(name) for name in names):
                self._malformed(replica, outcome)
                continue
            replica.outcome_seq = outcome.seq
            self._answered(replica, outcome)
        replica.mailbox.outcomes_read[0] = replica.outcome_seq
        gone = replica.changes.acks_read(set(acks.scheduled), acks.read_version)
        for parts in gone:  # replaced before the worker ever read it
            step = replica.mailbox.step[0]
            self._answered(replica, answer_change(parts, pb.SUPERSEDED, step))

    def _answered(self, replica, outcome: pb.Outcome) -> None:
        carried = self.transfer is not None and self.transfer.carries(outcome)
        if carried:  # told once its state is in the object store; settled here at once
            told = pb.Outcome()
            told.CopyFrom(outcome)
            self.transfer.carry(replica.name, told, lambda done: self._tell(replica, done))
        else:
            self._tell(replica, outcome)
        if self.transfer is not None:
            self.transfer.answered(replica.name, outcome)
        replica.changes.answered(outcome, replayed=outcome.origin == REPLAYED)
        done = outcome.state in NOT_APPLIED or outcome.name in S.ACTIONS  # an action: once
        if done and self.on_not_applied is not None:
            self.on_not_applied(replica, outcome)

    def _tell(self, replica, outcome: pb.Outcome) -> None:
        self._publish_outcome(replica, outcome)
        if self.on_answer is not None:
            self.on_answer(replica.name, outcome)

    def _malformed(self, replica, outcome: pb.Outcome) -> None:
        """An answer no worker of loomrun writes (its parameter's name, or a count far past
        the last one): left out, said once per replica, and the next ones are read."""
        if replica.name not in self._said_malformed:
            self._said_malformed.add(replica.name)
            say(f"{replica.name}: left out a malformed answer in its mailbox "
                f"(parameter {outcome.name[:64]!r}, number {outcome.seq})")  # fmt: skip

    def _publish_outcome(self, replica, outcome: pb.Outcome) -> None:
        outcome.replica = replica.name
        for part in [outcome, *outcome.parts]:
            taken = replica.changes.taken_change(outcome.change_id, part.name)
            arithmetic = taken is not None and taken.kind in (pb.SCALE, pb.SHIFT)
            if not part.new.WhichOneof("kind") and taken is not None and not arithmetic:
                part.new.CopyFrom(taken.value)  # too large for the acks: the ledger keeps it
        self.outbox.publish(S.outcomes(self.job, replica.name), outcome)
        if self.ledger is not None:
            self.ledger.record(outcome)
        if outcome.state == pb.SUPERSEDED:
            return  # never in effect: neither the latest answer nor an event
        for name in names_of(outcome):  # `get` reads the latest answer per parameter
            seen = part_of(outcome, name) if outcome.parts else outcome
            self.outbox.put(S.STATE, S.outcome(self.job, replica.name, name), seen)
        self.events(replica.name, *describe(outcome), step=outcome.step)

    def publish_status(self, replica, force: bool = False) -> None:
        now = time.monotonic()
        if replica.device is not None and now >= replica.next_telemetry:
            replica.telemetry = self.devices.telemetry(replica.device)
            replica.next_telemetry = now + TELEMETRY_INTERVAL
        message = pb.ReplicaStatus(
            job=self.job,
            replica=replica.name,
            host=self.host,
            state=replica.state,
            restarts=replica.restarts,
            exit_code=replica.exit_code,
            time=time.time(),
            pid=replica.pid,
        )
        if replica.status is not None:
            message.status.CopyFrom(replica.status)
        message.status.step = max(message.status.step, replica.mailbox.step[0])
        if replica.device is not None:
            message.device_uuid = replica.device.uuid
            message.device_name = replica.device.name
        if replica.telemetry is not None:
            message.gpu_util = replica.telemetry.util
            message.gpu_mem_used = replica.telemetry.mem_used
            message.gpu_mem_total = replica.telemetry.mem_total
        self.outbox.put(S.STATUS, S.status(self.job, replica.name), message)
        replica.next_status = now + (0 if force else STATUS_PUBLISH_INTERVAL)
        replica.heartbeat = now + HEARTBEAT_INTERVAL


def describe(outcome: pb.Outcome) -> tuple[str, str]:
    """An outcome as an event: its kind and its sentence."""
    word = state_word(outcome)
    if outcome.state == pb.APPLIED and outcome.name == S.PAUSE:
        word = "paused" if outcome.new.b else "resumed"
    return word, outcome_sentence(outcome)
