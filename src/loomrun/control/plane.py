"""ControlPlane: one node's connection to NATS for one job, as the supervisor drives it.

It wires the five parts (link, relay, pump, outbox, registry; see the package's docstring)
and takes the supervisor's news of its replicas: started, exited, about to restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

from google.protobuf.message import DecodeError

from loomrun import buckets, paramdoc
from loomrun import params as P
from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.broker.connect import BrokerOptions
from loomrun.control import history
from loomrun.control.changes import ReplicaChanges
from loomrun.control.ledger import Ledger
from loomrun.control.link import BrokerLink
from loomrun.control.outbox import Outbox
from loomrun.control.peers import Peers
from loomrun.control.pump import MailboxPump
from loomrun.control.registry import Registry
from loomrun.control.relay import DesiredRelay
from loomrun.control.rules import Rules
from loomrun.control.runs import Mark, earlier_parts, of_this_run
from loomrun.control.transfer import Transfer
from loomrun.devices import DeviceInfo, Devices
from loomrun.mailbox import Mailbox, MailboxError
from loomrun.outcomes import outcome_sentence
from loomrun.output import say
from loomrun.records import metrics_file, node_file, write_whole

ENDED = (pb.RESTARTING, pb.EXITED, pb.FAILED, pb.STOPPED)
RECORDS_AT_CLOSE = 5.0  # seconds a stopping supervisor waits for the ledger's last acks


class ReplicaView:
    """What the control plane knows of one replica: its state, its device, what the pump
    read last from its mailbox, and its changes (ReplicaChanges, moved by the relay and
    the pump).

    Its state has two owners, each with a field of its own, and is read in one place
    (`state`, a ReplicaState): the lifecycle is the supervisor's (`lifecycle`, `hung`,
    told through ControlPlane.replica_*), what the worker says of itself (`reported`:
    running or paused) comes through the pump from its status."""

    def __init__(self, name: str, local_rank: int, mailbox: Mailbox):
        self.name = name
        self.local_rank = local_rank
        self.mailbox = mailbox
        self.changes = ReplicaChanges()
        self.lifecycle: int = pb.STARTING  # until it ends: RESTARTING, EXITED, FAILED, STOPPED
        self.hung = False  # no step and no status for a while, as the supervisor sees it
        self.reported: int | None = None  # RUNNING or PAUSED, from the worker's last status
        self.pid = 0
        self.restarts = 0
        self.exit_code = 0
        self.device: DeviceInfo | None = None
        self.telemetry = None
        self.next_telemetry = 0.0
        # The pump's reading of the mailbox: the sequence numbers of what it read last,
        # the last answer taken, the last status, and when to publish the next one.
        self.seen = {"acks": 0, "schema": 0, "status": 0}
        self.outcome_seq = 0
        self.status: pb.Status | None = None
        self.unpublished = False  # a status read and not published yet
        self.schema: pb.Schema | None = None  # its parameters, as published last
        self.next_status = 0.0
        self.heartbeat = 0.0

    @property
    def state(self) -> int:
        """The replica's ReplicaState, as `watch`, `ls` and a `set` see it."""
        if self.lifecycle in ENDED:
            return self.lifecycle
        if self.hung and self.reported != pb.PAUSED:
            return pb.HUNG
        return self.reported or pb.STARTING

    def worker_reported(self, status: pb.Status) -> None:
        """The worker wrote a status: it moves, and says whether it is paused."""
        self.reported = pb.PAUSED if status.paused else pb.RUNNING
        self.hung = False


def wire(
    job: str, replicas: dict[str, ReplicaView], outbox: Outbox, link: BrokerLink | None = None,
    *, host: str = "", devices: Devices | None = None, events=None, ledger: Ledger | None = None,
    history: history.History | None = None,
) -> tuple[DesiredRelay, MailboxPump]:  # fmt: skip
    """The relay (changes in) and the pump (answers out) of these replicas, each knowing the
    other: a write the relay makes is polled for, a change not applied is written back."""
    pump = MailboxPump(job, host, replicas, outbox, devices, events or (lambda *a, **k: None))
    pump.ledger, pump.history = ledger, history
    relay = DesiredRelay(job, replicas, link, outbox, pump.written)
    pump.on_not_applied = relay.not_applied
    relay.transfer = pump.transfer = Transfer(job, link, replicas) if link is not None else None
    return relay, pump


class ControlPlane:
    """A node's NATS side, owned by the Supervisor: the relay and the pump of its replicas,
    the registry of the job and its devices, the ledger and the metric history, and the
    link to the broker (which it starts when none answers). The supervisor tells it of
    each replica's lifecycle (replica_started, replica_exited, replica_hung,
    replica_restarting)."""

    def __init__(
        self,
        job: str,
        node_rank: int,
        nnodes: int,
        script: str,
        replicas: list[ReplicaView],
        options: BrokerOptions,
        on_device_failure: Callable[[str, str], None],
        wait_broker: bool = False,
        tell: Callable[[str], None] | None = None,
        ledger_dirs: list[Path] | None = None,
        started: float | None = None,
        rules: list[pb.Rule] | None = None,
        rules_on: bool = True,
    ):
        self.job = job
        # When this node's run started, by its clock, and where in the state bucket (see
        # `of_this_run`), once it purged its own earlier failure record there.
        self.started = started or time.time()
        self._mark: Mark | None = None
        self.replicas = {r.name: r for r in replicas}
        self.on_device_failure = on_device_failure
        self.wait_broker = wait_broker
        host = socket.gethostname()
        self.devices = Devices()
        for replica in replicas:
            replica.device = self.devices.for_replica(replica.local_rank)
        self.link = BrokerLink(options, tell)
        self.outbox = Outbox(self.link)
        self.ledger = Ledger(job, self.outbox, ledger_dirs or [], node_rank, self.started)
        self.history = history.History(job, list(self.replicas))
        self.relay, self.pump = wire(
            job, self.replicas, self.outbox, self.link, host=host, devices=self.devices,
            events=self.event, ledger=self.ledger, history=self.history,
        )  # fmt: skip
        self._history_file = metrics_file(node_rank)
        self._schema_file = node_file("schema", ".json", node_rank)
        self._folders = ledger_dirs or []
        self.registry = Registry(
            job, node_rank, nnodes, script, host, options.url, self.replicas, self.outbox,
            self.event,
        )  # fmt: skip
        self._tasks: list[asyncio.Task] = []
        self._watch_task: asyncio.Task | None = None
        # Rules run on a job of one node (node 0 does not read other nodes' statuses).
        self.rules = Rules(job, self.replicas, self.ask, self._fired, False, rules)
        self._rules_on = rules_on and nnodes == 1  # once the broker takes their changes
        self.rules.outbox = self.outbox
        if nnodes == 1:
            self.pump.on_status, self.pump.on_answer = self.rules.status, self.rules.answered
            self.pump.reads_every_status = self.rules.reading
        # Called with each GroupFailure of another node of this job (the supervisor's).
        self.on_node_failure: Callable[[pb.GroupFailure], None] | None = None

    @classmethod
    def of(
        cls, spec, replicas, mailboxes, ledger_dirs, started, *, on_device_failure,
        on_node_failure, tell,
    ) -> ControlPlane:  # fmt: skip
        """The control plane of a supervisor's job (a LaunchSpec) and its replicas (each
        with name, local_rank, and proc once started), on their mailboxes."""
        views = [ReplicaView(r.name, r.local_rank, mailboxes[r.name]) for r in replicas]
        plane = cls(
            job=spec.job, node_rank=spec.node_rank, nnodes=spec.nnodes,
            script=" ".join([spec.target_name, *spec.args]), replicas=views,
            options=spec.broker, on_device_failure=on_device_failure,
            wait_broker=spec.wait_broker, tell=tell,
            ledger_dirs=ledger_dirs, started=started, rules=spec.rules, rules_on=not spec.replay,
        )  # fmt: skip
        plane.on_node_failure = on_node_failure
        for replica in replicas:
            if replica.proc is not None:
                plane.replica_started(replica.name, replica.proc.pid, replica.restarts)
        return plane

    # -- start and stop ---------------------------------------------------------------

    async def start(self) -> None:
        """Pump the mailboxes at once; connect (or start the bundled broker) beside it."""
        self._tasks.append(asyncio.ensure_future(self.pump.run()))
        self._tasks.append(asyncio.ensure_future(self._serve()))

    async def _serve(self) -> None:
        if not await self._serving():
            self.outbox.no_broker()  # the ledger is kept on disk only
            self.rules.off("no broker answers, and a rule's changes go through it")
            return
        self.registry.publish_all()
        self.rules.on = self._rules_on
        self.link.on_reconnect.append(self._resync)
        self._tasks.append(asyncio.ensure_future(self.outbox.run()))
        self._tasks.append(asyncio.ensure_future(self.outbox.run_records()))
        self._tasks.append(asyncio.ensure_future(self.registry.heartbeat()))
        if self.registry.nnodes > 1 and self.on_node_failure is not None:
            peers = Peers(self.job, self.registry.node_rank, self.registry.nnodes,
                          self.on_node_failure, self._steps)  # fmt: skip
            self._tasks.append(asyncio.ensure_future(peers.watch(self.link)))
        self._watch_task = asyncio.ensure_future(self.link.settle(self.relay.watch))
        if self.registry.nnodes == 1:
            self._tasks.append(asyncio.ensure_future(self.link.settle(self._watch_rules)))

    async def _serving(self) -> bool:
        """Connected, and the job's state set up on the broker: live control."""
        if not await self.link.connect(self.wait_broker):
            return False
        if not await self.link.settle(self._forget_last_run):
            return False
        try:
            await self.registry.subscribe(self.link.nc, self.on_device_failure)
            await self.link.nc.subscribe(S.history(self.job), cb=self._send_history)
            await self.link.nc.subscribe(S.node_failures(self.job), cb=self._node_failed)
            self._tasks.append(asyncio.ensure_future(self._missed_node_failures()))
        except Exception as error:  # noqa: BLE001 - never take the job down
            say(f"cannot set up the job's state on the broker ({error}); no live control")
            return False
        return True

    def _steps(self) -> int:
        """This node's replicas' step counters, summed: it moves while any steps."""
        return sum(int(replica.mailbox.step[0]) for replica in self.replicas.values())

    async def _forget_last_run(self) -> None:
        """A new run starts from the script's own values, not a past run's of the same id."""
        for name in self.replicas:
            for bucket in (S.DESIRED, S.STATE):
                for key in await self.link.keys(bucket, S.replica_keys(self.job, name)):
                    await self.link.kv[bucket].purge(key)
        if self.registry.node_rank == 0:
            earlier = await self.link.keys(S.DESIRED, S.rule(self.job))
            await self.rules.start_over(self.link.kv[S.DESIRED], earlier)
        own = S.node_failure_record(self.job, self.registry.node_rank)  # an earlier run's failure
        revision = await buckets.purge(self.link.nc, S.STATE, own)
        self._mark = Mark(await buckets.made(self.link.nc, S.STATE), revision, time.time())
        with contextlib.suppress(Exception):  # its change ledger too (kept on disk, set aside)
            await self._forget_ledger()

    async def _forget_ledger(self) -> None:
        """This node's part of an earlier run's change ledger goes; node 0's purge also takes
        the parts of node ranks this run does not have. Never another node's part of this
        run: that node may have answered changes before this one connected."""
        rank, nnodes = self.registry.node_rank, self.registry.nnodes
        whole = S.ledger(self.job, "*")
        found = await self.link.js.stream_info(S.LEDGER_STREAM, subjects_filter=whole)
        parts = {S.ledger(self.job, rank)} | (
            earlier_parts(found.state.subjects or {}, nnodes) if rank == 0 else set()
        )
        for subject in parts:
            await self.link.js.purge_stream(S.LEDGER_STREAM, subject=subject)
        if rank == 0:  # the one part an earlier loomrun kept, on a stream it made
            with contextlib.suppress(Exception):
                await self.link.js.purge_stream(S.LEDGER_STREAM, subject=S.ledger_before(self.job))

    async def _send_history(self, msg) -> None:
        """A client asks for a replica's metric history: the one of this node answers."""
        replica = S.last_token(msg.subject)
        if replica in self.history.series and msg.reply:
            try:
                await msg.respond(self.history.wire(replica, self.link.nc.max_payload))
            except Exception as error:  # noqa: BLE001 - the client hears nothing, and says so
                say(f"cannot send {replica}'s metric history: {error}")

    def ask(self, name: str, want: pb.DesiredParam, replicas: list[str]) -> None:
        """Want `want` of every one of `replicas` (of any node), as a client would write
        it: the supervisor's own changes (a save on SIGUSR1, a rule's). Kept while the
        broker is away."""
        for replica in replicas:
            key = (
                S.desired_pause(self.job, replica) if name == S.PAUSE
                else S.desired_param(self.job, replica, name)
            )  # fmt: skip
            self.outbox.put(S.DESIRED, key, want)

    async def _watch_rules(self) -> None:
        await self.rules.watch(self.link.kv[S.DESIRED])

    def _fired(self, outcome: pb.Outcome) -> None:
        """A rule fired for a replica: a record in the ledger, an event."""
        self.ledger.record(outcome)
        self.event(outcome.replica, "fired", outcome_sentence(outcome), step=outcome.step)

    def node_failed(
        self, attempt: int, give_up: bool, reason: str, exit_code: int, stopped: bool = False
    ) -> None:
        """Tell the other nodes: this node's group failed, and restarts or gives up. Sent
        once, and kept as this node's latest, for a node that is away at the moment."""
        rank = self.registry.node_rank
        word = pb.GroupFailure(
            job=self.job, node_rank=rank, attempt=attempt, give_up=give_up, reason=reason,
            exit_code=exit_code, time=time.time(), stopped=stopped,
        )  # fmt: skip
        self.outbox.publish(S.node_failures(self.job), word)
        self.outbox.put(S.STATE, S.node_failure_record(self.job, rank), word)

    async def _missed_node_failures(self) -> None:
        """At the first connection and after each reconnect: the other nodes' latest
        failures of this run, which may have gone out while this node was not listening.
        Each is followed once (the supervisor knows which restart it is at), so one heard
        already changes nothing."""
        if self.on_node_failure is None or self.registry.nnodes == 1 or self._mark is None:
            return
        pattern = S.node_failure_record(self.job, "*")
        try:
            stream_made = await buckets.made(self.link.nc, S.STATE)
            found = await buckets.entries(self.link.nc, S.STATE, pattern)
        except Exception as error:  # noqa: BLE001 - the live word may still come
            say(f"cannot read the other nodes' failures on the broker ({error})")
            return
        for revision, data in found.values():
            try:
                word = pb.GroupFailure.FromString(data)
            except DecodeError:
                continue
            ours = of_this_run(revision, word.time, stream_made, self._mark, self.started)
            if word.node_rank != self.registry.node_rank and ours:
                self.on_node_failure(word)

    async def _node_failed(self, msg) -> None:
        try:
            word = pb.GroupFailure.FromString(msg.data)
        except DecodeError:
            say("a malformed group failure message on the broker was left out")
            return
        if word.node_rank != self.registry.node_rank and self.on_node_failure is not None:
            self.on_node_failure(word)

    async def _resync(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._watch_task = asyncio.ensure_future(self.link.settle(self.relay.watch))
        self._tasks = [t for t in self._tasks if not t.done()]
        if self.registry.nnodes == 1:
            self._tasks.append(asyncio.ensure_future(self.link.settle(self._watch_rules)))
        self._tasks.append(asyncio.ensure_future(self._missed_node_failures()))
        self.registry.publish_all()
        for replica in self.replicas.values():
            replica.seen["schema"] = 0  # published again: the store may be a new one
            self.pump.publish_status(replica, force=True)
        self.outbox.wake()

    async def close(self, exit_code: int) -> None:
        """Record how the job ended, drop its devices, flush what is pending, stop a bundled
        broker. The job stays listed as finished, so `ls` and `watch` can say how it ended."""
        self.link.closing = True
        if self.pump.transfer is not None:  # a share being stored is answered, then flushed
            await self.pump.transfer.close()
        for task in self._tasks:  # the final flush below is the only one running
            task.cancel()
        if self.link.connected:
            for replica in self.replicas.values():
                if replica.lifecycle not in (pb.EXITED, pb.FAILED):
                    replica.lifecycle = pb.STOPPED  # by loomrun: a signal, or another failed
                self._last_read(replica)
                self.pump.publish_status(replica, force=True)
                self.registry.drop_device(replica)
            self.registry.publish_job(finished=time.time(), exit_code=exit_code)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.outbox.flush(), 3.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.outbox.flush_records(), RECORDS_AT_CLOSE)
        missing = self.outbox.unacked + self.outbox.dropped
        if missing:
            kept = "changes.jsonl has them" if self.ledger.on_disk else "no file has them"
            say(f"{missing} change ledger record(s) may be missing from the broker's copy "
                f"(not acked); {kept}")  # fmt: skip
        for error in self.history.write(self._folders, self._history_file):
            say(error)  # written while the broker still answers for it: no gap between
        for error in write_whole(self._folders, self._schema_file, self._schema_document()):
            say(error)
        if self._watch_task is not None:
            self._watch_task.cancel()
        self.rules.stop()
        await self.link.close()
        self.devices.close()
        self.ledger.close()

    def _schema_document(self) -> str:
        """This node's replicas' parameters, as `loomrun schema` prints them, with the
        values in effect at the end: kept next to the ledger once the job ends."""
        specs, values = {}, {}
        for name, replica in self.replicas.items():
            if replica.schema is None:
                continue
            with contextlib.suppress(P.ParamError):
                specs[name] = {s.name: P.spec_from_pb(s) for s in replica.schema.params}
            if replica.status is not None:
                values[name] = {n: P.from_pb(v) for n, v in replica.status.values.items()}
        return json.dumps(paramdoc.document(self.job, paramdoc.entries(specs, values)))

    # -- lifecycle, from the supervisor -------------------------------------------------------

    def replica_restarting(self, name: str) -> None:
        """Before a replica's next worker starts (the last one stopped): its last answers
        read, then a clean mailbox holding the desired state to start from."""
        replica = self.replicas[name]
        self._last_read(replica)  # what it applied up to its end: what is in effect
        replica.mailbox.reset_worker_side()
        self.relay.rebase(replica)
        self.rules.restarting(name)

    def replica_started(self, name: str, pid: int, restarts: int) -> None:
        replica = self.replicas[name]
        replica.lifecycle, replica.pid, replica.restarts, replica.exit_code = (
            pb.STARTING, pid, restarts, 0,
        )  # fmt: skip
        replica.hung, replica.reported, replica.status = False, None, None
        replica.seen = {"acks": 0, "schema": 0, "status": 0}
        replica.unpublished = False
        replica.outcome_seq = 0
        self.registry.register_device(replica)
        self._hung_changed()
        if restarts:
            self.event(name, "restarted", f"pid {pid}, restart {restarts}")
        else:
            self.event(name, "started", f"pid {pid}")
        self.pump.publish_status(replica, force=True)

    def replica_exited(self, name: str, exit_code: int, text: str, restarting: bool) -> None:
        replica = self.replicas[name]
        self._last_read(replica)  # where it really ended
        replica.exit_code = exit_code
        if restarting:
            replica.lifecycle = pb.RESTARTING
        else:
            replica.lifecycle = pb.EXITED if exit_code == 0 else pb.FAILED
        self.event(name, "exited" if exit_code == 0 else "failed", text, code=exit_code)
        self._hung_changed()
        if not restarting:
            self.registry.drop_device(replica)
        self.pump.publish_status(replica, force=True)

    def _last_read(self, replica: ReplicaView) -> None:
        try:
            self.pump.read_back(replica, time.monotonic(), final=True)
        except MailboxError as error:
            say(f"{replica.name}: {error}")

    def replica_hung(self, name: str, hung: bool) -> None:
        replica = self.replicas[name]
        was = replica.state
        replica.hung = hung
        if replica.state == pb.HUNG and was != pb.HUNG:
            self.event(name, "hung", "no step and no status for a while")
        self._hung_changed()
        self.pump.publish_status(replica, force=True)

    def _hung_changed(self) -> None:
        hung = {r.name for r in self.replicas.values() if r.state == pb.HUNG}
        if hung != self.registry.hung:
            self.registry.hung = hung
            self.registry.publish_job()

    def event(self, replica: str, kind: str, text: str, step: int = 0, code: int = 0) -> None:
        event = pb.Event(
            job=self.job, replica=replica, kind=kind, text=text, time=time.time(), step=step,
            code=code,
        )  # fmt: skip
        self.outbox.publish(S.events(self.job, replica), event)
