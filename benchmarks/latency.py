"""Latency of a live change, from issue to acknowledged apply, p50 and p99.

A worker steps about every 1 ms under loomrun; `set lr=...` is issued many times through
the Python API (one connection) and through the CLI (a process per call). The baseline,
measured in the same run on the same broker, is NATS's own request-reply round trip.
Targets: API p50 <= 3 ms, p99 <= 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loomrun.broker import BrokerOptions, BundledBroker
from loomrun.client import SteerError, Steering
from loomrun.supervisor import free_port

HERE = Path(__file__).resolve().parent
LOOMRUN = str(Path(sys.executable).parent / "loomrun")
JOB = f"latency-{os.getpid()}"


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return statistics.median(ordered) * 1000, p99 * 1000


async def wait_ready(options: BrokerOptions) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            async with Steering.connect(options) as steering:
                if "lr" in await steering.schema(JOB, "r0"):
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the job did not come up")


async def measure(options: BrokerOptions, calls: int) -> dict[str, list[float]]:
    async with Steering.connect(options) as steering:
        nc = steering.nc

        async def echo(msg):
            await msg.respond(msg.data)

        await nc.subscribe("bench.echo", cb=echo)
        round_trips = []
        for _ in range(calls):
            started = time.perf_counter()
            await nc.request("bench.echo", b"x", timeout=2)
            round_trips.append(time.perf_counter() - started)

        api_total, api_ack = [], []
        for i in range(calls):
            started = time.perf_counter()
            (result,) = await steering.set(JOB, {"lr": 0.01 + (i % 7) * 0.001}, timeout=10)
            api_total.append(time.perf_counter() - started)
            if result.state != "applied":
                raise SteerError(f"set #{i} was {result.state}")
            api_ack.append(result.latency)
    return {"broker round trip": round_trips, "API set()": api_total, "API write->ack": api_ack}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--cli-calls", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        env = {**os.environ, "XDG_STATE_HOME": state}
        os.environ["XDG_STATE_HOME"] = state
        broker = BundledBroker.start(free_port())
        env["LOOMRUN_NATS"] = broker.url
        job = subprocess.Popen(
            [LOOMRUN, "--job", JOB, str(HERE / "step_loop.py"), "--steps", "100000000", "--quiet"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            options = BrokerOptions(broker.url)
            asyncio.run(wait_ready(options))
            results = asyncio.run(measure(options, args.calls))
            cli = []
            for i in range(args.cli_calls):
                started = time.perf_counter()
                subprocess.run(
                    [LOOMRUN, "set", f"lr={0.02 + i * 0.0001}", "--job", JOB],
                    env=env,
                    check=True,
                    capture_output=True,
                )
                cli.append(time.perf_counter() - started)
            results["CLI loomrun set"] = cli
        finally:
            job.send_signal(signal.SIGTERM)
            job.wait(60)
            broker.stop()
    for name, samples in results.items():
        p50, p99 = percentiles(samples)
        print(f"{name:18s} p50 {p50:8.2f} ms   p99 {p99:8.2f} ms   ({len(samples)} calls)")
    base = statistics.median(results["broker round trip"])
    ack = statistics.median(results["API write->ack"])
    print(f"API write->ack / broker round trip = {ack / base:.1f}x")
    print("targets: API p50 <= 3 ms, p99 <= 10 ms")


if __name__ == "__main__":
    main()
