"""A rule's firing latency, as users get it: a job under loomrun with the rule
`loss.max > 10` -> `set knob=knob*0.5`, whose script reports a loss of 100 for one step
every SPIKE_EVERY steps (about 1,000 steps a second). Each figure runs from the spike's
step (its wall time, as the script wrote it) to the rule's change applied by the worker
(the time of its answer), in seconds and in steps: the status interval (0.1 s), the
supervisor's read, the broker's round trip and the next step boundary.

The baseline, measured in the same run on the same job: `Steering.set` of the same
parameter through the Python API, from its issue to its acknowledged apply (the broker's
round trip and a step boundary, without the wait for a status).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loomrun.broker.bundled import BundledBroker
from loomrun.broker.connect import BrokerOptions
from loomrun.client import Steering
from loomrun.launch import free_port

LOOMRUN = str(Path(sys.executable).parent / "loomrun")
JOB = f"rules-{os.getpid()}"
SPIKE_EVERY = 400
SPIKES = 12
RULES = """[blip]
when = "loss.max > 10"
then = "set knob=knob*0.5"
cooldown = 50
"""
WORKER = """
import sys, time
import loomrun
knob = loomrun.param("knob", float, default=1.0)
spikes = open(sys.argv[1], "a", buffering=1)
step = 0
while True:
    step += 1
    spike = step % SPIKE_EVERY == 0
    if spike:
        spikes.write(f"{step} {time.time()}\\n")
    loomrun.step(loss=100.0 if spike else 1.0)
    time.sleep(0.001)
""".replace("SPIKE_EVERY", str(SPIKE_EVERY))


async def api_sets(options: BrokerOptions, rounds: int) -> list[float]:
    seconds = []
    async with Steering.connect(options) as steering:
        for i in range(rounds):
            started = time.perf_counter()
            (result,) = await steering.set(JOB, {"knob": 2.0 + i}, timeout=30)
            if result.state != "applied" or result.outcome.change_id != result.change_id:
                raise SystemExit(f"the set was {result.state}: {result.sentence()}")
            seconds.append(time.perf_counter() - started)
    return seconds


def firings(ledger: Path, spikes: Path) -> list[tuple[float, int]]:
    """(seconds, steps) from each spike to its firing's change applied."""
    if not ledger.exists() or not spikes.exists():
        return []
    at = {int(s): float(t) for s, t in (line.split() for line in spikes.read_text().splitlines())}
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    fired = [r for r in records if r["outcome"] == "fired"]
    applied = {r["change_id"]: r for r in records if r["outcome"] == "applied"}
    out = []
    for firing in fired:
        done = next((a for cid, a in applied.items() if cid.startswith(firing["change_id"])), None)
        spike = max((s for s in at if s <= firing["step"]), default=None)
        if done is not None and spike is not None:
            out.append((done["time"] - at[spike], done["step"] - spike))
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as state:
        env = {**os.environ, "XDG_STATE_HOME": state, "OMP_NUM_THREADS": "1"}
        os.environ["XDG_STATE_HOME"] = state
        broker = BundledBroker.start(free_port())
        env["LOOMRUN_NATS"] = broker.url
        script, rules, spikes = (Path(state) / n for n in ("train.py", "rules.toml", "spikes"))
        script.write_text(WORKER)
        rules.write_text(RULES)
        job = subprocess.Popen(
            [LOOMRUN, "--job", JOB, "--rules", str(rules), str(script), str(spikes)], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        ledger = Path(state) / "loomrun" / "jobs" / JOB / "changes.jsonl"
        try:
            deadline = time.monotonic() + 120
            while len(found := firings(ledger, spikes)) < SPIKES:
                if time.monotonic() > deadline or job.poll() is not None:
                    raise SystemExit(f"only {len(found)} firings came")
                time.sleep(0.2)
            base = asyncio.run(api_sets(BrokerOptions(broker.url), 20))
        finally:
            job.terminate()
            job.wait(timeout=60)
            broker.stop()
    seconds = statistics.median(s for s, _ in found)
    steps = statistics.median(n for _, n in found)
    worst = max(s for s, _ in found)
    api = statistics.median(base)
    print(
        f"rule firing, spike to its change applied: p50 {seconds * 1000:.0f} ms "
        f"(max {worst * 1000:.0f} ms over {len(found)}), {steps:.0f} steps at ~1 kHz; "
        f"{seconds / api:.1f}x a Steering.set of the same parameter (p50 {api * 1000:.1f} ms)"
    )


if __name__ == "__main__":
    main()
