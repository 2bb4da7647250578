"""Drives a running job's mailbox from a test the way the supervisor does: desired in, acks out."""

from __future__ import annotations

import time

from conftest import wait_for

from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb
from loomrun.desired import DesiredConfig
from loomrun.mailbox import Mailbox, segment_path


class Steer:
    def __init__(self, job: str, replica: str = "r0", timeout: float = 60):
        path = segment_path(job, replica)
        wait_for(path.exists, timeout, what=f"mailbox of {job}/{replica}")
        self.box = Mailbox.attach(path)
        self.desired = DesiredConfig()

    def set(self, name: str, value, at_step: int = 0) -> int:
        version = self.desired.set(name, value, at_step=at_step)
        self.box.desired.write(self.desired.state)
        return version

    def pause(self, paused: bool) -> int:
        version = self.desired.pause(paused)
        self.box.desired.write(self.desired.state)
        return version

    def outcome(self, name: str, version: int, timeout: float = 30) -> pb.Outcome:
        def answered():
            _, acks = self.box.acks.read()
            if acks is not None and name in acks.outcomes:
                outcome = acks.outcomes[name]
                return outcome if outcome.version >= version else None
            return None

        return wait_for(answered, timeout, what=f"the outcome of {name} v{version}")

    def status(self) -> pb.Status:
        return self.box.status.read()[1] or pb.Status()

    def wait_step(self, step: int, timeout: float = 60) -> pb.Status:
        return wait_for(
            lambda: (s := self.status()).step >= step and s, timeout, what=f"step {step}"
        )

    def schema(self) -> dict[str, P.ParamSpec]:
        _, schema = self.box.schema.read()
        return {s.name: P.spec_from_pb(s) for s in schema.params} if schema else {}

    def value(self, name: str):
        return P.from_pb(self.status().values[name])

    def close(self) -> None:
        self.box.close()


def stays_still(steer: Steer, seconds: float) -> bool:
    first = steer.status().step
    time.sleep(seconds)
    return steer.status().step == first
