"""Starting, steering and waiting on real jobs from the end-to-end tests: a job id of its
own per test, the CLI's supervisor started through the `procs` fixture, and `Steering`
driven from synchronous test code."""

from __future__ import annotations

import asyncio
import os
import secrets

from conftest import wait_for

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.broker import BrokerError
from loomrun.broker.connect import BrokerOptions
from loomrun.client import SteerError, Steering


def job_id(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def steering(work, url: str | None = None):
    """Run `work(steering)` against the test broker from synchronous test code."""

    async def session():
        async with Steering.connect(BrokerOptions(url or os.environ["LOOMRUN_NATS"])) as s:
            return await work(s)

    return asyncio.run(session())


def wait_ready(job: str, replicas=("r0",), name="lr", url=None, timeout=60):
    """Until every replica published `name` in its schema (builtins: after its first step)."""

    async def ready(s):
        for replica in replicas:
            try:
                if name not in await s.schema(job, replica):
                    return False
            except SteerError:  # not registered yet
                return False
        return True

    def probe():
        try:
            return steering(ready, url)
        except BrokerError:  # the job has not started its bundled broker yet
            return False

    wait_for(probe, timeout, interval=0.2, what=f"{job} to publish {name}")


def start(procs, script, *args, job, replicas=1, extra=(), env=None):
    return procs.start("--replicas", replicas, "--job", job, *extra, script, *args, env=env)


def events(job: str, url=None) -> list[pb.Event]:
    """Every event of the job on the broker so far."""

    async def read(s):
        js = s.nc.jetstream()
        sub = await js.subscribe(S.events(job, ">"), ordered_consumer=True)
        events = []
        try:
            while True:
                msg = await sub.next_msg(timeout=0.5)
                events.append(pb.Event.FromString(msg.data))
        except Exception:  # noqa: BLE001 - no more for now
            pass
        await sub.unsubscribe()
        return events

    return steering(read, url)


def steps_seen(job: str) -> int:
    """r0's step as its last status says."""

    async def status(s):
        found = (await s.statuses(job)).get("r0")
        return found.status.step if found else 0

    return steering(status)


def cli_json(*args) -> tuple[int, dict]:
    """A steering command with --json: its exit code and what it printed."""
    import json

    from conftest import run_loomrun

    result = run_loomrun(*args, "--json", timeout=120)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def one_step(answer: dict) -> int:
    """The step every replica answered a change at (the ranks of a group: one)."""
    steps = {c["step"] for c in answer["changes"]}
    assert len(steps) == 1, f"every rank at one step: {answer}"
    return steps.pop()
