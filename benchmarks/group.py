"""A 64-rank process group under one supervisor: one `set lr=...` to every rank, from
issue to every rank's acknowledged apply at one common step (target 500 ms, none late).

The ranks (benchmarks/group_rank.py: gloo, a real torch.optim step every 50 ms) agree on
a change in band at agreement points (runtime.group: about every 20 ms of steps, farther
when the agreement's all_reduce would take over 2% of the time, a second apart at most),
so a change waits for the next point, then applies on every rank at the same step.
Baseline from the same run: the same `set` to a 2-rank group of the same script. Every
answer is checked to be `applied`, its own change's, and at the one step all ranks share.
Sets are issued a random 0-2 s apart, as a person's would be, so that they fall anywhere
between two points.

On a 2-core machine 64 torch ranks oversubscribe the CPU 32 times: they step slower than
asked, an all_reduce among them waits for 64 processes to be scheduled in turn (so the
points are as far apart as allowed), and the supervisor, one process among 65 runnable
ones, gets a small share of the CPU. The pace line says how slow; the fan-out itself is
measured apart, at 64 independent replicas, by benchmarks/scale.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scale import ready, running  # benchmarks/ is on the path of a script run from it

from loomrun.broker.connect import BrokerOptions
from loomrun.client import Steering
from loomrun.launch import free_port

HERE = Path(__file__).resolve().parent
LOOMRUN = [sys.executable, "-m", "loomrun.cli"]


async def set_latency(options: BrokerOptions, job: str, calls: int) -> tuple[list[float], float]:
    """Each set's latency, and the ranks' steps per second meanwhile (from the steps the
    answers name)."""
    samples, marks = [], []
    async with Steering.connect(options) as steering:
        for i in range(calls):
            await asyncio.sleep(random.uniform(0, 2.0))
            started = time.perf_counter()
            results = await steering.set(job, {"lr": 0.01 + (i % 7) * 0.001}, timeout=60)
            samples.append(time.perf_counter() - started)
            bad = [r for r in results if r.state != "applied" or not r.outcome]
            if bad:
                raise SystemExit(f"set #{i} was not applied everywhere: {bad[0].as_dict()}")
            if any(r.outcome.change_id != r.change_id for r in results):
                raise SystemExit(f"set #{i}: an answer belonged to another change")
            steps = {r.outcome.step for r in results}
            if len(steps) != 1:
                raise SystemExit(f"set #{i}: ranks applied at different steps {sorted(steps)}")
            marks.append((time.perf_counter(), steps.pop()))
    (first, first_step), (last, last_step) = marks[0], marks[-1]
    return samples, (last_step - first_step) / max(last - first, 1e-9)


def measure(ranks: int, env: dict, options: BrokerOptions, calls: int):
    job = f"group{ranks}-{os.getpid()}"
    with running(job, ranks, HERE / "group_rank.py", env):
        asyncio.run(ready(options, job, ranks, name="lr", timeout=600))
        return asyncio.run(set_latency(options, job, calls))


def ms(samples: list[float]) -> str:
    return f"p50 {statistics.median(samples) * 1000:.0f} ms, max {max(samples) * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    state = tempfile.mkdtemp(prefix="loomrun-group-")
    url = f"nats://127.0.0.1:{free_port()}"
    env = {**os.environ, "XDG_STATE_HOME": state, "LOOMRUN_NATS": url, "OMP_NUM_THREADS": "1"}
    os.environ.update(XDG_STATE_HOME=state)  # this process reads the broker's secret there
    options = BrokerOptions(url)
    try:
        small, small_rate = measure(2, env, options, args.calls)
        large, large_rate = measure(args.ranks, env, options, args.calls)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    print(
        f"one set to every rank of a process group, to every rank's applied answer at one "
        f"common step ({args.calls} sets each, none late): {args.ranks} ranks {ms(large)} "
        f"(target 500 ms); 2 ranks {ms(small)}; "
        f"ratio {statistics.median(large) / statistics.median(small):.1f}x"
    )
    print(
        f"the ranks' pace meanwhile (50 ms steps asked): {args.ranks} ranks {large_rate:.1f} "
        f"steps/s, 2 ranks {small_rate:.1f} steps/s, on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
