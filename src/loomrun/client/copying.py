"""`loomrun copy r2 --from r0`: r2 takes r0's training state at its next step, with no
restart (exploit), and the values given beside it (explore), as Steering.copy does it.

Three changes, each waited on for its own answer: r0 shares its state at one step (written
to shared memory; for a replica on another host, carried through the broker's object
store by the supervisors), the values are set on r2, then r2 copies the state in at its
next step. The values go first so that from the step of the copy on, r2 trains r0's state
with its own new values (the weights it had meanwhile are replaced). Each target gets its
own share, one after another (a share is a change of the source's one key): two targets
may get r0's state of two steps.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.client.model import Result, SteerError

WAYS = ("auto", "shm", "store")


async def copy_state(
    steering, job: str | None, targets: list[str], source: str, values: dict[str, Any],
    via: str = "auto", timeout: float = 60.0,
) -> list[Result]:  # fmt: skip
    """Each target takes `source`'s state (and `values`): the answers of the shares, the
    sets and the copies, in that order for each target."""
    if via not in WAYS:
        raise SteerError(f"via is one of {', '.join(WAYS)}, not {via!r}")
    found = await steering.job(job)
    steering.targets(found, [source, *targets])  # each one of the job's
    if not targets:
        raise SteerError("copy needs a replica to copy into")
    if source in targets:
        raise SteerError(f"{source} cannot copy its own state")
    if len(set(targets)) != len(targets):
        raise SteerError("a replica to copy into is named twice")
    schemas = await steering.schemas(found.job)
    grouped = [r for r in (source, *targets) if r in schemas and schemas[r].group_size > 1]
    if grouped:
        raise SteerError(
            f"{grouped[0]} is a rank of a process group of {schemas[grouped[0]].group_size}: copy "
            "is for independent replicas (the ranks of a group train one model together)"
        )
    ended = await steering._not_running(found.job, [source])
    if source in ended:
        raise SteerError(f"{source} is not running ({ended[source]}): there is no state to copy")
    checked = await steering.check(found.job, targets, values) if values else {}
    hosts = {r: s.host for r, s in (await steering.statuses(found.job)).items()}
    parts: list = []  # per target: its share's answers, then the task of its values and copy
    try:
        for target in targets:  # one share after another: each a change of the source's key
            way = _way(via, hosts, source, target)
            shared, token = await _share(steering, found.job, target, source, way, timeout)
            parts.append(shared)
            if shared and shared[0].state == "applied":
                parts.append(asyncio.ensure_future(_copy_in(
                    steering, found.job, target, source, checked.get(target, {}), way, token,
                    shared[0].outcome.step, timeout,
                )))  # fmt: skip
        tasks = [part for part in parts if isinstance(part, asyncio.Future)]
        await asyncio.gather(*tasks)
    except BaseException:
        for part in parts:
            if isinstance(part, asyncio.Future):
                part.cancel()
        raise
    return [
        r for part in parts for r in (part.result() if isinstance(part, asyncio.Future) else part)
    ]


def _way(via: str, hosts: dict[str, str], source: str, target: str) -> str:
    """Through shared memory on one host; through the object store between two (or when
    where one of them runs is not known)."""
    if via != "auto":
        return via
    here, there = hosts.get(source), hosts.get(target)
    return "shm" if here and here == there else "store"


async def _share(
    steering, job: str, target: str, source: str, via: str, timeout: float
) -> tuple[list[Result], str]:
    token = secrets.token_hex(8)
    asked = {"target": target, "token": token, "via": via}
    shared = await steering._one(
        job, [source], S.SHARE, lambda r: S.desired_param(job, r, S.SHARE), asked, None, True,
        timeout, True,
    )  # fmt: skip
    return shared, token


async def _copy_in(
    steering, job: str, target: str, source: str, values: dict[str, Any], via: str,
    token: str, step: int, timeout: float,
) -> list[Result]:  # fmt: skip
    results = []
    if values:
        writes = [(target, {n: (S.desired_param(job, target, n), v) for n, v in values.items()})]
        results += await steering.correlator.write_and_wait(
            job, writes, 0, True, timeout, True, pb.SET
        )
    wanted = {"from": source, "token": token, "step": step, "via": via}
    results += await steering._one(
        job, [target], S.COPY, lambda r: S.desired_param(job, r, S.COPY), wanted, None, True,
        timeout, True,
    )  # fmt: skip
    return results
