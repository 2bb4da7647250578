"""What a step boundary costs a script, timed from inside it: run under plain `python` (the
baseline) and under `loomrun --no-broker` by benchmarks/poll.py. Prints one JSON line of the
best ns per call of each case over several rounds (noise only ever adds time)."""

import json
import sys
import time

import torch

import loomrun

CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
ROUNDS = 15

weight = torch.nn.Parameter(torch.zeros(1))
weight.grad = torch.zeros(1)
optimizer = torch.optim.SGD([weight], lr=0.0)  # a real optimizer; lr 0 keeps it a no-op


def public_step(calls: int) -> None:
    step = loomrun.step
    for _ in range(calls):
        step()


def optimizer_step(calls: int) -> None:
    step = optimizer.step
    for _ in range(calls):
        step()


def backward(calls: int) -> None:
    """Under loomrun, the loss of a script that reports none is taken here."""
    for _ in range(calls):
        (weight * 2.0).sum().backward()


def empty_loop(calls: int) -> None:
    for _ in range(calls):
        pass


best: dict[str, float] = {}
cases = {
    "empty loop": empty_loop,
    "loomrun.step()": public_step,
    "optimizer.step()": optimizer_step,
    "loss.backward()": backward,
}
for _ in range(ROUNDS):
    for name, fn in cases.items():
        calls = {"optimizer.step()": CALLS // 4, "loss.backward()": CALLS // 20}.get(name, CALLS)
        started = time.perf_counter_ns()
        fn(calls)
        best[name] = min(best.get(name, float("inf")), (time.perf_counter_ns() - started) / calls)
print(json.dumps(best), flush=True)
