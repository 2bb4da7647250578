"""Drives a job's mailbox from a test the way the supervisor does: desired in, acks out.

Only for jobs started with --no-broker: then no control plane writes the desired slot, and
this is its one writer. A job with live control is steered through `Steering` or the CLI.
"""

from __future__ import annotations

from conftest import wait_for

from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb
from loomrun.desired import PAUSE, DesiredConfig
from loomrun.mailbox import Mailbox, find_segment


class Steer:
    def __init__(self, job: str, replica: str = "r0", timeout: float = 60):
        path = wait_for(lambda: find_segment(job, replica), timeout, what=f"{job}/{replica}")
        self.box = Mailbox.attach(path)
        self.desired = DesiredConfig()

    def set(self, name: str, value, at_step: int = 0) -> str:
        change_id = self.desired.set(name, value, at_step=at_step)
        self.box.desired.write(self.desired.state)
        return change_id

    def pause(self, paused: bool) -> str:
        return self.set(PAUSE, paused)

    def outcome(self, name: str, change_id: str, timeout: float = 30) -> pb.Outcome:
        def answered():
            _, acks = self.box.acks.read()
            for outcome in acks.recent if acks is not None else ():
                if outcome.name == name and outcome.change_id == change_id:
                    return outcome
            return None

        return wait_for(answered, timeout, what=f"the outcome of {name} ({change_id})")

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


def stays_still(steer: Steer, statuses: int = 5) -> bool:
    """The step does not move while the worker writes `statuses` more statuses (a paused
    worker still writes one every tenth of a second)."""
    first = steer.status()
    wait_for(
        lambda: steer.status().time >= first.time + statuses * 0.1,
        30,
        what=f"{statuses} more statuses",
    )
    return steer.status().step == first.step
