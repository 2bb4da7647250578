"""`loomrun copy` of a ~10 M-parameter model (AdamW, CPU) between two replicas of a job, as
users ask for it: through the Python API (`Steering.copy`, what `loomrun copy` calls), on
one host through shared memory, and through the broker's JetStream object store (the way
between hosts, taken here on one host with --via store).

Each figure: the source's time to write its state out (share), the target's time to put
it in place (copy), each from its own answer, and the request's whole time (the share,
the copy, and the waits for two step boundaries between). The baselines, measured in the
same run on the same job: a `snapshot` of the same state (a copy in the worker's own
memory), its worker time and its request's whole time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

from snapshot import baselines, on_a_job

from loomrun.broker.connect import BrokerOptions
from loomrun.client import Steering

JOB = f"copy-{os.getpid()}"


async def ready(steering: Steering) -> None:
    for _ in range(150):
        try:
            schemas = await steering.schemas(JOB)
            if all("lr" in schemas.get(r, ()).specs for r in ("r0", "r1") if r in schemas) and (
                len(schemas) == 2
            ):
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the job did not come up")


async def measure(options: BrokerOptions, rounds: int) -> dict[str, list]:
    out: dict[str, list] = {}
    async with Steering.connect(options) as steering:
        await ready(steering)
        for way in ("snapshot", "shm", "store"):
            for _ in range(rounds):
                started = time.perf_counter()
                if way == "snapshot":
                    results = await steering.act(JOB, "snapshot", {"name": "b"}, ["r0"], timeout=60)
                else:
                    results = await steering.copy(JOB, ["r1"], "r0", via=way, timeout=120)
                whole = time.perf_counter() - started
                if any(r.state != "applied" for r in results):
                    raise SystemExit(f"{way}: {[r.sentence() for r in results]}")
                done = {r.name: r.as_dict()["new"] for r in results}
                out.setdefault(way, []).append((done, whole))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        base = baselines(3, state)
        launch = ["--replicas", "2", "--job", JOB]
        found = on_a_job(state, launch, lambda options: measure(options, args.rounds))
    mb = base["bytes"] / 1e6
    print(f"model: {base['params'] / 1e6:.1f} M parameters; with AdamW's state {mb:.0f} MB")
    snap = statistics.median(d["snapshot"]["seconds"] for d, _ in found["snapshot"])
    snap_whole = statistics.median(w for _, w in found["snapshot"])
    print(
        f"baseline: snapshot of r0, worker {snap * 1000:.1f} ms, request {snap_whole * 1000:.1f} ms"
    )
    for way, words in (("shm", "one host, shared memory"), ("store", "the object store")):
        share = statistics.median(d["share"]["seconds"] for d, _ in found[way])
        copy = statistics.median(d["copy"]["seconds"] for d, _ in found[way])
        whole = statistics.median(w for _, w in found[way])
        size = found[way][0][0]["copy"]["bytes"] / 1e6
        print(
            f"copy via {way:5s} ({words}): {size:.0f} MB; share {share * 1000:6.1f} ms "
            f"({share / snap:.2f}x the snapshot), copy in {copy * 1000:6.1f} ms "
            f"({copy / snap:.2f}x); request, whole {whole * 1000:7.1f} ms "
            f"({whole / snap_whole:.1f}x the snapshot's request)"
        )


if __name__ == "__main__":
    main()
