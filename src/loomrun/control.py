"""The supervisor's NATS side: desired config in, acks, schema, status and events out.

Data flows one way: the desired-config bucket is watched and copied into the mailboxes;
what the workers write back into the mailboxes is published. Publishing is coalesced per
key (only the latest state matters) and runs in its own task, so a slow or absent broker
never holds up the mailboxes, let alone a training step. On reconnect the watcher starts
over from the bucket's current contents: a change made while disconnected still lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable

from google.protobuf.message import DecodeError

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.broker import (
    BrokerError,
    BrokerOptions,
    BundledBroker,
    answers,
    host_port,
    import_nats,
    is_loopback,
)
from loomrun.desired import DesiredConfig
from loomrun.devices import DeviceInfo, Devices
from loomrun.mailbox import Mailbox, MailboxError
from loomrun.output import say

STATUS_PUBLISH_INTERVAL = 0.25
TELEMETRY_INTERVAL = 1.0
# The mailboxes are polled fast only while a change written to one is still unanswered
# (a set is waiting on it): a busy spin for SPIN_FOR, since most changes land within a step
# and asyncio cannot sleep less than 1 ms; then every FAST_POLL, up to FAST_POLL_FOR.
SPIN_FOR = 0.005
FAST_POLL = 0.001
SLOW_POLL = 0.02
FAST_POLL_FOR = 2.0


class ReplicaView:
    """What the control plane needs to know of one replica; the supervisor keeps it current."""

    def __init__(self, name: str, local_rank: int, mailbox: Mailbox):
        self.name = name
        self.local_rank = local_rank
        self.mailbox = mailbox
        self.state = "starting"
        self.pid = 0
        self.restarts = 0
        self.exit_code = 0
        self.device: DeviceInfo | None = None
        self.desired = DesiredConfig()
        self.seen = {"acks": 0, "schema": 0, "status": 0}
        self.outcomes: dict[str, tuple[int, bool]] = {}
        self.status: pb.Status | None = None
        self.next_status = 0.0
        self.telemetry = None
        self.next_telemetry = 0.0


class ControlPlane:
    """One node's connection to NATS for one job."""

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
    ):
        self.job = job
        self.node_rank = node_rank
        self.nnodes = nnodes
        self.script = script
        self.replicas = {r.name: r for r in replicas}
        self.options = options
        self.on_device_failure = on_device_failure
        self.wait_broker = wait_broker
        self.host = socket.gethostname()
        self.devices = Devices()
        for replica in replicas:
            replica.device = self.devices.for_replica(replica.local_rank)
        self.started = time.time()
        self.nc = None
        self.js = None
        self.kv: dict[str, object] = {}
        self.broker: BundledBroker | None = None
        self._latest: dict[tuple[str, str], bytes | None] = {}
        self._events: deque[pb.Event] = deque(maxlen=10_000)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._watcher = None
        self._watch_task: asyncio.Task | None = None
        self._unanswered: dict[tuple[str, str], float] = {}
        self._written = asyncio.Event()
        self._spin_until = 0.0
        self._closing = False

    # -- start and stop ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect (starting the bundled broker when nothing answers on loopback) and serve."""
        self._tasks.append(asyncio.ensure_future(self._pump_mailboxes()))
        self._tasks.append(asyncio.ensure_future(self._connect_and_serve()))

    async def _connect_and_serve(self) -> None:
        while not self._closing:
            try:
                await self._connect()
                break
            except BrokerError as error:
                if not self.wait_broker and not is_loopback(self.options.url):
                    say(f"{error}; this job runs without live control")
                    return
                say(f"{error}; trying again")
                await asyncio.sleep(2.0)
        if self.nc is None:
            return
        try:
            await self._prepare()
        except Exception as error:  # noqa: BLE001 - never take the job down
            say(f"cannot set up the job's state on the broker ({error}); no live control")
            return
        self._tasks.append(asyncio.ensure_future(self._publish()))
        self._tasks.append(asyncio.ensure_future(self._heartbeat()))
        self._watch_task = asyncio.ensure_future(self._watch_desired())

    async def _connect(self) -> None:
        nats = import_nats()

        host, port = host_port(self.options.url)
        if is_loopback(self.options.url) and not answers(host, port):
            await self._start_bundled(port)
        try:
            self.nc = await nats.connect(
                **self.options.connect_kwargs(),
                connect_timeout=2,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                disconnected_cb=self._disconnected,
                reconnected_cb=self._reconnected,
                error_cb=self._error,
            )
        except Exception as error:  # noqa: BLE001 - one sentence, then the caller decides
            raise BrokerError(
                f"cannot reach the NATS broker at {self.options.url} ({error})"
            ) from None
        self.js = self.nc.jetstream()

    async def _start_bundled(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            start = functools.partial(BundledBroker.start, port, token=self.options.token)
            self.broker = await loop.run_in_executor(None, start)
            say(f"started the bundled NATS broker on {self.broker.url} (loopback only)")
        except BrokerError as error:
            if "already answers" not in str(error):  # another job won the race: share it
                raise

    async def _prepare(self) -> None:
        await self._ensure_buckets()
        for name in self.replicas:  # a new run starts from the script's own values
            for key in await self._keys(self.kv[S.DESIRED], f"{self.job}.{name}.>"):
                await self.kv[S.DESIRED].purge(key)
            for key in await self._keys(self.kv[S.STATE], f"{self.job}.{name}.>"):
                await self.kv[S.STATE].purge(key)
        await self.nc.subscribe(S.DEVICE_FAILED, cb=self._device_failed)
        for replica in self.replicas.values():
            if replica.device is not None:
                self._register_device(replica)
        self._queue_job_info()

    async def _ensure_buckets(self) -> None:
        """The buckets and the events stream; a broker started afresh may have none."""
        from nats.js import api

        self.kv[S.DESIRED] = await self._bucket(S.DESIRED)
        self.kv[S.STATE] = await self._bucket(S.STATE)
        self.kv[S.STATUS] = await self._bucket(S.STATUS, storage=api.StorageType.MEMORY, ttl=3600)
        self.kv[S.JOBS] = await self._bucket(S.JOBS, ttl=86400)
        self.kv[S.DEVICES] = await self._bucket(S.DEVICES)
        with contextlib.suppress(Exception):
            await self.js.add_stream(
                name=S.EVENTS_STREAM, subjects=[S.EVENTS_SUBJECTS], max_age=86400, max_msgs=100_000
            )

    async def _bucket(self, name: str, **config):
        from nats.js.errors import BucketNotFoundError

        for _ in range(3):
            try:
                return await self.js.key_value(name)
            except BucketNotFoundError:
                pass
            with contextlib.suppress(Exception):  # another supervisor may create it first
                return await self.js.create_key_value(bucket=name, history=1, **config)
        return await self.js.key_value(name)

    @staticmethod
    async def _keys(kv, pattern: str) -> list[str]:
        watcher = await kv.watch(pattern, meta_only=True, ignore_deletes=True)
        keys = []
        async for entry in watcher:
            if entry is None:
                break
            keys.append(entry.key)
        await watcher.stop()
        return keys

    async def close(self, exit_code: int) -> None:
        """Record how the job ended, drop its devices, flush what is pending, stop a bundled
        broker. The job stays listed as finished, so `ls` and `watch` can say how it ended."""
        self._closing = True
        for task in self._tasks:  # the final flush below is the only one running
            task.cancel()
        if self.nc is not None and self.nc.is_connected:
            for replica in self.replicas.values():
                if replica.state not in ("exited", "failed"):
                    replica.state = "stopped"  # by loomrun: a signal, or another one failed
                self._queue_status(replica, force=True)
                if replica.device is not None:
                    self._latest[(S.DEVICES, S.device(replica.device.uuid))] = None
            self._queue_job_info(finished=time.time(), exit_code=exit_code)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush(), 3.0)
        for task in [*self._tasks, self._watch_task]:
            if task is not None:
                task.cancel()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 3.0)
        if self.broker is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.broker.stop)
        self.devices.close()

    # -- connection events -------------------------------------------------------------

    async def _disconnected(self) -> None:
        if self._closing:
            return
        say(f"lost the NATS broker at {self.options.url}; training goes on, reconnecting")
        if is_loopback(self.options.url):
            asyncio.ensure_future(self._take_over())

    async def _take_over(self) -> None:
        """The job that started the shared broker ended: start it again, state intact."""
        await asyncio.sleep(random.uniform(0.1, 0.6))
        host, port = host_port(self.options.url)
        if self._closing or answers(host, port):
            return
        with contextlib.suppress(BrokerError):
            await self._start_bundled(port)

    async def _reconnected(self) -> None:
        say(f"reconnected to the NATS broker at {self.options.url}")
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._watch_task = asyncio.ensure_future(self._resync())
        self._queue_job_info()
        for replica in self.replicas.values():
            if replica.device is not None:
                self._register_device(replica)
        self._wake.set()

    async def _error(self, error) -> None:
        return None  # disconnects are reported once by _disconnected, not per retry

    # -- desired config: NATS -> mailbox ------------------------------------------------

    async def _resync(self) -> None:
        try:
            await self._ensure_buckets()
        except Exception as error:  # noqa: BLE001 - retried on the next reconnect
            say(f"cannot set up the job's state on the broker again ({error})")
            return
        await self._watch_desired()

    async def _watch_desired(self) -> None:
        kv = self.kv[S.DESIRED]
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        try:
            self._watcher = watcher = await kv.watch(f"{self.job}.>")
        except Exception as error:  # noqa: BLE001 - retried on the next reconnect
            say(f"cannot watch the desired config ({error})")
            return
        async for entry in watcher:
            if entry is not None:
                self._apply_entry(entry)

    def _apply_entry(self, entry) -> None:
        parsed = S.split_desired(entry.key)
        if parsed is None or parsed[0] not in self.replicas:
            return
        replica = self.replicas[parsed[0]]
        kind, name = parsed[1], parsed[2]
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            if kind == "param":
                replica.desired.drop(name)
            self._write_desired(replica, name or S.PAUSE)
            return
        try:
            want = pb.DesiredParam.FromString(entry.value)
        except DecodeError:
            say(f"ignored a malformed desired value for {entry.key} (not a DesiredParam)")
            return
        if kind == "param":
            replica.desired.put(name, want, entry.revision)
        else:
            value = want.value.b if want.value.WhichOneof("kind") == "b" else None
            if value is None:
                say(f"ignored a malformed pause value for {entry.key} (expected a boolean)")
                return
            replica.desired.pause(value, entry.revision, want.at_step)
        self._write_desired(replica, name or S.PAUSE, entry.revision)

    def _write_desired(self, replica: ReplicaView, name: str, version: int = 0) -> None:
        try:
            replica.mailbox.desired.write(replica.desired.state)
        except MailboxError as error:
            replica.desired.drop(name)
            say(f"{replica.name}: {error}")
            if version:
                outcome = pb.Outcome(
                    name=name, version=version, reason=str(error), time=time.time()
                )
                self._put(S.STATE, S.outcome(self.job, replica.name, name), outcome)
            return
        if version:
            now = time.monotonic()
            self._unanswered[(replica.name, name)] = now + FAST_POLL_FOR
            self._spin_until = now + SPIN_FOR
            self._written.set()

    # -- mailbox -> NATS ------------------------------------------------------------------

    async def _pump_mailboxes(self) -> None:
        while True:
            now = time.monotonic()
            for replica in self.replicas.values():
                try:
                    self._read_back(replica, now)
                except MailboxError as error:
                    say(f"{replica.name}: {error}")
            if self._unanswered:
                self._unanswered = {k: t for k, t in self._unanswered.items() if t > now}
            if self._unanswered:
                await asyncio.sleep(0 if now < self._spin_until else FAST_POLL)
                continue
            self._written.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._written.wait(), SLOW_POLL)

    def _read_back(self, replica: ReplicaView, now: float) -> None:
        box = replica.mailbox
        if box.acks.seq[0] != replica.seen["acks"]:
            seq, acks = box.acks.read()
            replica.seen["acks"] = seq
            if acks is not None:
                for name, outcome in acks.outcomes.items():
                    if replica.outcomes.get(name) != (outcome.version, outcome.applied):
                        replica.outcomes[name] = (outcome.version, outcome.applied)
                        self._unanswered.pop((replica.name, name), None)
                        self._queue_outcome(replica, outcome)
        if box.schema.seq[0] != replica.seen["schema"]:
            seq, schema = box.schema.read()
            replica.seen["schema"] = seq
            if schema is not None:
                self._put(S.STATE, S.schema(self.job, replica.name), schema)
        if box.status.seq[0] != replica.seen["status"] and now >= replica.next_status:
            seq, status = box.status.read()
            replica.seen["status"] = seq
            if status is not None:
                replica.status = status
                if replica.state in ("starting", "running", "paused"):
                    replica.state = "paused" if status.paused else "running"
                self._queue_status(replica)

    def _queue_outcome(self, replica: ReplicaView, outcome: pb.Outcome) -> None:
        self._put(S.STATE, S.outcome(self.job, replica.name, outcome.name), outcome)
        if outcome.name == S.PAUSE:
            kind = "paused" if outcome.new.b else "resumed"
            text = f"{kind} at step {outcome.step}"
        elif outcome.applied:
            kind = "applied"
            change = f"{_show(outcome.old)} -> {_show(outcome.new)}"
            text = f"{outcome.name} {change} at step {outcome.step}"
            if outcome.late:
                text += " (late)"
        else:
            kind, text = "rejected", f"{outcome.name}={_show(outcome.new)}: {outcome.reason}"
        self.event(replica.name, kind, text, step=outcome.step)

    def _queue_status(self, replica: ReplicaView, force: bool = False) -> None:
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
        if replica.device is not None:
            message.device_uuid = replica.device.uuid
            message.device_name = replica.device.name
        if replica.telemetry is not None:
            message.gpu_util = replica.telemetry.util
            message.gpu_mem_used = replica.telemetry.mem_used
            message.gpu_mem_total = replica.telemetry.mem_total
        self._put(S.STATUS, S.status(self.job, replica.name), message)
        replica.next_status = now + (0 if force else STATUS_PUBLISH_INTERVAL)

    # -- lifecycle, from the supervisor -------------------------------------------------------

    def replica_started(self, name: str, pid: int, restarts: int) -> None:
        replica = self.replicas[name]
        replica.state, replica.pid, replica.restarts, replica.exit_code = (
            "starting",
            pid,
            restarts,
            0,
        )
        replica.status = None
        replica.seen = {"acks": 0, "schema": 0, "status": 0}
        replica.outcomes.clear()
        self._register_device(replica)
        if restarts:
            self.event(name, "restarted", f"pid {pid}, restart {restarts}")
        else:
            self.event(name, "started", f"pid {pid}")
        self._queue_status(replica, force=True)

    def replica_exited(self, name: str, exit_code: int, text: str, restarting: bool) -> None:
        replica = self.replicas[name]
        replica.exit_code = exit_code
        if restarting:
            replica.state = "restarting"
        else:
            replica.state = "exited" if exit_code == 0 else "failed"
        kind = "exited" if exit_code == 0 else "failed"
        self.event(name, kind, text, code=exit_code)
        if replica.device is not None and not restarting:
            self._latest[(S.DEVICES, S.device(replica.device.uuid))] = None
            self._wake.set()
        self._queue_status(replica, force=True)

    def event(self, replica: str, kind: str, text: str, step: int = 0, code: int = 0) -> None:
        self._events.append(
            pb.Event(
                job=self.job,
                replica=replica,
                kind=kind,
                text=text,
                time=time.time(),
                step=step,
                code=code,
            )
        )
        self._wake.set()

    def _register_device(self, replica: ReplicaView) -> None:
        device = replica.device
        record = pb.Device(
            uuid=device.uuid,
            job=self.job,
            replica=replica.name,
            host=self.host,
            pid=replica.pid,
            name=device.name,
            memory=device.memory,
        )
        self._put(S.DEVICES, S.device(device.uuid), record)

    def _queue_job_info(self, finished: float = 0.0, exit_code: int = 0) -> None:
        info = pb.JobInfo(
            job=self.job,
            host=self.host,
            replicas=list(self.replicas),
            started=self.started,
            script=self.script,
            pid=os.getpid(),
            node_rank=self.node_rank,
            nnodes=self.nnodes,
            heartbeat=time.time(),
            broker=self.options.url,
            finished=finished,
            exit_code=exit_code,
        )
        self._put(S.JOBS, S.job_node(self.job, self.node_rank), info)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(S.HEARTBEAT_SECONDS)
            self._queue_job_info()

    async def _device_failed(self, msg) -> None:
        try:
            failure = pb.DeviceFailure.FromString(msg.data)
        except DecodeError:
            say(f"ignored a malformed message on {S.DEVICE_FAILED} (expected a DeviceFailure)")
            return
        for replica in self.replicas.values():
            if replica.device is not None and replica.device.uuid == failure.uuid:
                reason = failure.reason or "reported by a health checker"
                self.event(replica.name, "device_failed", f"device {failure.uuid} failed: {reason}")
                self.on_device_failure(replica.name, f"device {failure.uuid} failed: {reason}")

    # -- publishing ---------------------------------------------------------------------------

    def _put(self, bucket: str, key: str, message) -> None:
        self._latest[(bucket, key)] = message.SerializeToString()
        self._wake.set()

    async def _publish(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except Exception:  # noqa: BLE001 - disconnected: kept, sent after reconnecting
                await asyncio.sleep(0.5)
                self._wake.set()

    async def _flush(self) -> None:
        """Outcomes first (a `set` waits on them), then the rest; events and status, which
        change often and matter only as the latest, go out without waiting for an ack."""
        while self._latest or self._events:
            if self.nc is None or not self.nc.is_connected:
                raise ConnectionError("not connected")
            while self._events:
                event = self._events[0]
                await self.nc.publish(S.events(self.job, event.replica), event.SerializeToString())
                self._events.popleft()
            if not self._latest:
                break
            item = next((k for k in self._latest if k[0] == S.STATE), None)
            bucket, key = item or next(iter(self._latest))
            data = self._latest[(bucket, key)]
            kv = self.kv[bucket]
            if data is None:
                with contextlib.suppress(Exception):
                    await kv.delete(key)
            elif bucket == S.STATUS:
                await self.nc.publish(f"$KV.{S.STATUS}.{key}", data)
            else:
                await kv.put(key, data)
            if self._latest.get((bucket, key), _GONE) is data:
                del self._latest[(bucket, key)]


_GONE = object()


def _show(value: pb.Value) -> str:
    from loomrun import params as P

    return P.format_value(P.from_pb(value))
