"""What keeping a steered lr in effect costs a step, timed from inside a script run by
benchmarks/poll.py under `loomrun` with a broker. Two real SGD optimizers of GROUPS param
groups each (zero grads: every step is a no-op) step in turn, after a first optimizer that
counts the steps; `loomrun set lr.0=... lr.1=... --hold` (one per group of the first of
the two) steers one of them. Both run through the same hooks; the difference between
them, round by round, is the keeping. It prints `ready` when the keys are published,
waits until every change is in effect (all its param groups hold the value: the 16 keys
may come at different boundaries, and the rounds below take none), then
prints one JSON line: the best ns per step of each over ROUNDS interleaved rounds, and the
median over the rounds of the difference between the two in one round (the machine's
noise moves both alike within a round)."""

import json
import statistics
import sys
import time

import torch

CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 5_000
ROUNDS = 41
GROUPS = 16


def optimizer(lr: float) -> torch.optim.SGD:
    weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(GROUPS)]
    for weight in weights:
        weight.grad = torch.zeros(1)
    return torch.optim.SGD([{"params": [w]} for w in weights], lr=lr)


counting = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
counting.step()  # the first optimizer to step counts the steps: neither of the two below
steered, plain = optimizer(0.5), optimizer(0.5)  # groups 1..4 and 5..8 of the job
steered.step()
plain.step()
print("ready", flush=True)
deadline = time.monotonic() + 60
while any(group["lr"] == 0.5 for group in steered.param_groups):  # all 16 changes in
    if time.monotonic() > deadline:
        sys.exit("no change came in 60 s")
    counting.step()
    steered.step()
    time.sleep(0.01)
best = {"steered": float("inf"), "unsteered": float("inf")}
differences = []
for _ in range(ROUNDS):
    took = {}
    for name, one in (("steered", steered), ("unsteered", plain)):
        step = one.step
        started = time.perf_counter_ns()
        for _ in range(CALLS):
            step()
        took[name] = (time.perf_counter_ns() - started) / CALLS
        best[name] = min(best[name], took[name])
    differences.append(took["steered"] - took["unsteered"])
median = statistics.median(differences)
print(json.dumps({"groups": GROUPS, **best, "difference": median}), flush=True)
