"""The job's record and its devices on the broker, and device failures from health checkers.

Each node's supervisor keeps one JobInfo with a heartbeat (a job whose heartbeats stop is
"lost"), and one Device record per replica's device, so a health checker that publishes a
DeviceFailure naming a UUID reaches the replica that uses it.
"""

from __future__ import annotations

import asyncio
import os
import time

from google.protobuf.message import DecodeError

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.output import say


class Registry:
    def __init__(self, job, node_rank, nnodes, script, host, url, replicas, outbox, events):
        self.job, self.node_rank, self.nnodes, self.script = job, node_rank, nnodes, script
        self.host, self.url = host, url
        self.replicas = replicas
        self.outbox = outbox
        self.events = events
        self.started = time.time()
        self.on_device_failure = None
        self.hung: set[str] = set()

    async def subscribe(self, nc, on_device_failure) -> None:
        self.on_device_failure = on_device_failure
        await nc.subscribe(S.DEVICE_FAILED, cb=self._device_failed)

    def publish_all(self) -> None:
        """Everything this node registers: again after a reconnect (the store may be new)."""
        self.publish_job()
        for replica in self.replicas.values():
            self.register_device(replica)

    def publish_job(self, finished: float = 0.0, exit_code: int = 0) -> None:
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
            broker=self.url,
            finished=finished,
            exit_code=exit_code,
            hung=sorted(self.hung),
        )
        self.outbox.put(S.JOBS, S.job_node(self.job, self.node_rank), info)

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(S.HEARTBEAT_SECONDS)
            self.publish_job()

    def register_device(self, replica) -> None:
        device = replica.device
        if device is None:
            return
        record = pb.Device(
            uuid=device.uuid,
            job=self.job,
            replica=replica.name,
            host=self.host,
            pid=replica.pid,
            name=device.name,
            memory=device.memory,
        )
        self.outbox.put(S.DEVICES, S.device(device.uuid), record)

    def drop_device(self, replica) -> None:
        if replica.device is not None:
            self.outbox.delete(S.DEVICES, S.device(replica.device.uuid))

    async def _device_failed(self, msg) -> None:
        try:
            failure = pb.DeviceFailure.FromString(msg.data)
        except DecodeError:
            say(f"ignored a malformed message on {S.DEVICE_FAILED} (expected a DeviceFailure)")
            return
        for replica in self.replicas.values():
            if replica.device is not None and replica.device.uuid == failure.uuid:
                reason = failure.reason or "reported by a health checker"
                note = f"device {failure.uuid} failed: {reason}"
                self.events(replica.name, "device_failed", note)
                self.on_device_failure(replica.name, note)
