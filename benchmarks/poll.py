"""What a step costs with loomrun, through what users call: `loomrun.step()` and a real
`torch.optim` optimizer's `step()` (loomrun's global pre-hook is the boundary there).

The same script (benchmarks/step_cost_worker.py) runs under plain `python`, the baseline,
where both are what they are without loomrun, and under `loomrun --no-broker`, where each
call is a step boundary that finds no change. Also, in this process: an empty
`multiprocessing.Queue.get_nowait()`, what the original torchLoom design polled every step.
Targets: both <= 0.3 us above the baseline; the boundary >= 20x cheaper than the queue.
Also `loss.backward()` of a scalar, where loomrun keeps the loss of a script that reports
none (a reference, read only when a status is due); and, in this process, what the
dispatch of each optimizer kind's step on the instance's class adds to a real SGD step
(runtime/switch.py: what makes `set optimizer=...` take effect at the step it lands at).

And a step with a steered value in effect (benchmarks/steered_cost_worker.py under
`loomrun`, steered by a real `loomrun set lr.N=... --hold`): before each step loomrun looks
whether the script wrote each steered group (and puts the value in effect back if so),
after it whether the step wrote over it. Target: <= 0.3 us per step per param group above
an unsteered optimizer of as many groups, stepped in turn with it in the same process.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import secrets
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "step_cost_worker.py"
STEERED = HERE / "steered_cost_worker.py"
LOOMRUN = [sys.executable, "-m", "loomrun.cli"]


def measure(command: list[str]) -> dict[str, float]:
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    last = out.stdout.strip().splitlines()[-1]  # under loomrun: "[r0] {...}"
    return json.loads(last[last.index("{") :])


def queue_ns(calls: int = 50_000) -> float:
    q = multiprocessing.Queue()
    get = q.get_nowait
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter_ns()
        for _ in range(calls):
            try:  # noqa: SIM105 - suppress() would add its own cost to the baseline
                get()
            except queue.Empty:
                pass
        best = min(best, (time.perf_counter_ns() - started) / calls)
    q.close()
    return best


def steered_cost() -> dict[str, float]:
    """The same optimizer step before and after `loomrun set lr=... --hold`, one process."""
    job = f"bench-steered-{secrets.token_hex(3)}"
    run = subprocess.Popen(
        [*LOOMRUN, "--job", job, str(STEERED)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        for line in run.stdout:
            if line.strip().endswith("ready"):
                break
        keys = [f"lr.{group}=1e-9" for group in range(1, 17)]  # the steered optimizer's
        changed = subprocess.run(
            [*LOOMRUN, "set", *keys, "--hold", "--job", job], capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        if changed.returncode != 0:
            raise RuntimeError(f"loomrun set failed: {changed.stdout}{changed.stderr}")
        out, err = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    if run.returncode != 0:
        raise RuntimeError(f"the steered worker failed: {err[-2000:]}")
    last = out.strip().splitlines()[-1]
    return json.loads(last[last.index("{") :])


def dispatch_cost(rounds: int = 41, calls: int = 2_000) -> dict[str, float]:
    """A real SGD step of one small parameter, with each kind's step a dispatch on the
    instance's class (what `set optimizer=...` needs, runtime/switch.py) and without it,
    in alternating rounds in this process: the median of the rounds' differences."""
    import statistics

    import torch

    from loomrun.runtime import switch

    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.ones(4)
    optimizer = torch.optim.SGD([param], lr=1e-9)
    optimizer.step()  # torch hooks the class's step at its first construction
    hooked = torch.optim.SGD.step
    switch.install()
    dispatched = torch.optim.SGD.step

    def timed(step) -> float:
        torch.optim.SGD.step = step
        started = time.perf_counter_ns()
        for _ in range(calls):
            optimizer.step()
        return (time.perf_counter_ns() - started) / calls

    differences, plain = [], []
    for _ in range(rounds):
        base = timed(hooked)
        differences.append(timed(dispatched) - base)
        plain.append(base)
    torch.optim.SGD.step = dispatched
    return {"step": statistics.median(plain), "extra": statistics.median(differences)}


def main() -> None:
    plain = measure([sys.executable, str(WORKER)])
    steered = measure([sys.executable, "-m", "loomrun.cli", "--no-broker", str(WORKER)])
    for name in ("loomrun.step()", "optimizer.step()", "loss.backward()"):
        base = plain[name] - plain["empty loop"]
        with_loomrun = steered[name] - steered["empty loop"]
        extra = with_loomrun - base
        target = "a reference, no target" if name == "loss.backward()" else "target <= 0.3 us"
        print(
            f"{name:18s} python {base:8.1f} ns  loomrun {with_loomrun:8.1f} ns  "
            f"+{extra / 1000:.3f} us per step ({target})"
        )
    boundary = steered["loomrun.step()"] - steered["empty loop"]
    ratio = queue_ns() / boundary
    print(f"queue.get_nowait / loomrun.step() = {ratio:.0f}x (target >= 20x)")
    dispatch = dispatch_cost()
    print(
        f"optimizer.step() dispatched on its class (the optimizer switch): "
        f"+{dispatch['extra']:.0f} ns per step, on a step of {dispatch['step'] / 1000:.1f} us "
        "(a reference, no target; the median of the rounds' differences)"
    )
    kept = steered_cost()
    groups = kept["groups"]
    extra = kept["difference"] / groups
    print(
        f"optimizer.step() of {groups} param groups: lr held {kept['steered']:8.1f} ns  "
        f"not steered {kept['unsteered']:8.1f} ns  +{extra / 1000:.3f} us per step per group "
        "(target <= 0.3 us; the median of the rounds' differences)"
    )


if __name__ == "__main__":
    main()
