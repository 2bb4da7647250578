"""`make demo`: the whole mission in under a minute, and a check of its own outcome.

Starts examples/train.py on 4 replicas in the background (the bundled NATS broker starts
itself), lists the job, changes lr on r1 while it trains, pauses and resumes every
replica, prints a snapshot of `loomrun watch`, and lets the job finish cleanly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOOMRUN = str(Path(sys.executable).parent / "loomrun")
JOB = f"demo-{os.getpid()}"


def loomrun(*args: str, show: bool = True) -> subprocess.CompletedProcess:
    if show:
        print(f"\n$ loomrun {' '.join(args)}", flush=True)
    result = subprocess.run([LOOMRUN, *args], capture_output=True, text=True, timeout=120)
    if show:
        sys.stdout.write(result.stdout)
        sys.stdout.write(result.stderr)
        sys.stdout.flush()
    return result


def wait_until_steerable(job: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if job.poll() is not None:
            raise SystemExit(f"demo failed: the job exited early with {job.returncode}")
        result = loomrun("get", "--job", JOB, "--json", show=False)
        if result.returncode == 0:
            names = {(p["replica"], p["name"]) for p in json.loads(result.stdout)["params"]}
            if all((f"r{i}", "lr") in names for i in range(4)):
                return
        time.sleep(0.5)
    raise SystemExit("demo failed: the job did not become steerable in 90 s")


def main() -> int:
    train = [
        str(HERE / "train.py"), "--steps", "4000", "--step-time", "0.004", "--print-every", "1000",
    ]  # fmt: skip
    print(f"$ loomrun examples/train.py --replicas 4 --job {JOB} ... &", flush=True)
    job = subprocess.Popen(
        [LOOMRUN, "--replicas", "4", "--job", JOB, *train],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    failures = []
    try:
        wait_until_steerable(job)
        listed = loomrun("ls")
        if JOB not in listed.stdout:
            failures.append("ls does not list the job")
        changed = loomrun("set", "lr=0.002", "--replica", "r1", "--job", JOB)
        if changed.returncode != 0 or "-> 0.002" not in changed.stdout:
            failures.append("set lr=0.002 on r1 was not acknowledged")
        for command in ("pause", "resume"):
            if loomrun(command, "--job", JOB).returncode != 0:
                failures.append(f"{command} was not acknowledged")
        replicas = {f"r{i}" for i in range(4)}
        deadline = time.monotonic() + 10
        while True:  # until the status after the change is in: it is a few tenths away
            snapshot = loomrun("watch", "--once", "--job", JOB, show=False)
            lines = snapshot.stdout.splitlines()
            rows = {line.split()[0]: line for line in lines if line.strip()}
            if replicas <= set(rows) and "0.002" in rows["r1"]:
                print(f"\n$ loomrun watch --once --job {JOB}\n{snapshot.stdout}", flush=True)
                break
            if time.monotonic() > deadline:
                failures.append("watch --once does not show 4 replicas with r1's new lr")
                break
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.terminate()
            job.communicate(timeout=60)
    print("\n$ # the job's own output:")
    print(output, end="")
    if job.returncode != 0:
        failures.append(f"the job exited with {job.returncode}")
    if "[r1] step  4000" not in output or "lr 0.002" not in output:
        failures.append("r1 did not finish its 4000 steps at lr 0.002")
    if failures:
        print("\ndemo failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    print("\ndemo ok: launched, steered r1 live, paused and resumed all, watched, finished cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
