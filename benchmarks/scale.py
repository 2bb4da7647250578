"""64 replicas on one supervisor: torch-free workers (benchmarks/stepper.py, 20 steps a
second each) stepping and reporting. Figures, each against a baseline from this run:

- the supervisor's CPU, as a share of one core (target < 25%), against the same job with
  2 replicas;
- status freshness as `watch --json` sees it: every replica's age, the largest of each
  snapshot (target < 0.5 s);
- one `set` to all 64 independent replicas, issue to every replica's acknowledged apply,
  through the Python API (target 100 ms), against one `set` to a 2-replica job (a
  change waits for the replica's next step: 50 ms steps here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loomrun.broker.connect import BrokerOptions
from loomrun.client import Steering
from loomrun.launch import free_port

HERE = Path(__file__).resolve().parent
LOOMRUN = [sys.executable, "-m", "loomrun.cli"]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def ready(
    options: BrokerOptions, job: str, replicas: int, name: str = "scale", timeout: float = 300
) -> None:
    """Wait until every replica of `job` has declared the parameter `name`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            async with Steering.connect(options) as steering:
                schemas = await steering.schemas(job)
                if sum(name in s.specs for s in schemas.values()) == replicas:
                    return
        await asyncio.sleep(0.5)
    raise SystemExit(f"{job} did not come up in {timeout:g} s")


async def set_latency(options: BrokerOptions, job: str, calls: int) -> list[float]:
    samples = []
    async with Steering.connect(options) as steering:
        for i in range(calls):
            started = time.perf_counter()
            results = await steering.set(job, {"scale": 0.5 + (i % 7) * 0.01}, timeout=30)
            samples.append(time.perf_counter() - started)
            bad = [r for r in results if r.state != "applied"]
            if bad:
                raise SystemExit(f"set was not applied everywhere: {bad[0].as_dict()}")
    return samples


def freshness(env: dict, job: str, snapshots: int) -> list[float]:
    worst = []
    for _ in range(snapshots):
        out = subprocess.run([*LOOMRUN, "watch", "--once", "--json", "--job", job], env=env,
                             capture_output=True, text=True, check=True)  # fmt: skip
        rows = json.loads(out.stdout)["jobs"][0]["replicas"]
        worst.append(max(r["age"] for r in rows))
    return worst


@contextlib.contextmanager
def running(job: str, replicas: int, script: Path, env: dict):
    """`loomrun --replicas N script 0.05` (steps of 50 ms), stopped at the end."""
    sup = subprocess.Popen(
        [*LOOMRUN, "--replicas", str(replicas), "--job", job, str(script), "0.05"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        yield sup
    finally:
        os.killpg(sup.pid, signal.SIGTERM)
        sup.wait(180)


def measure(replicas: int, env: dict, options: BrokerOptions) -> dict:
    job = f"scale{replicas}-{os.getpid()}"
    with running(job, replicas, HERE / "stepper.py", env) as sup:
        asyncio.run(ready(options, job, replicas))
        before, began = cpu_seconds(sup.pid), time.monotonic()
        time.sleep(10.0)
        cpu = (cpu_seconds(sup.pid) - before) / (time.monotonic() - began)
        ages = freshness(env, job, 10)
        sets = asyncio.run(set_latency(options, job, 30))
        return {"cpu": cpu, "ages": ages, "sets": sets}


def ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"


def main() -> None:
    state = tempfile.mkdtemp(prefix="loomrun-scale-")
    url = f"nats://127.0.0.1:{free_port()}"
    env = {**os.environ, "XDG_STATE_HOME": state, "LOOMRUN_NATS": url}
    os.environ.update(XDG_STATE_HOME=state)  # this process reads the broker's secret there
    options = BrokerOptions(url)
    try:
        small = measure(2, env, options)
        large = measure(64, env, options)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    print(
        f"supervisor CPU: 64 replicas {large['cpu']:.1%} of a core (target < 25%), "
        f"2 replicas {small['cpu']:.1%}; ratio {large['cpu'] / max(small['cpu'], 1e-9):.1f}x"
    )
    print(
        f"status age seen by watch --json, the largest per snapshot: 64 replicas median "
        f"{statistics.median(large['ages']):.2f} s, max {max(large['ages']):.2f} s "
        f"(target < 0.5 s); 2 replicas max {max(small['ages']):.2f} s"
    )
    print(
        f"one set to every replica, to its acknowledged apply: 64 replicas {ms(large['sets'])} "
        f"(target 100 ms); 2 replicas {ms(small['sets'])}; "
        f"ratio {statistics.median(large['sets']) / statistics.median(small['sets']):.1f}x"
    )


if __name__ == "__main__":
    main()
