"""What keeping a steered lr in effect costs a step, timed from inside a script run by
benchmarks/poll.py under `loomrun` with a broker: a real SGD optimizer of GROUPS param
groups (zero grads: each step is a no-op), under a LambdaLR as schedulers are used.
First the unsteered step, then it prints `ready` and waits until `loomrun set lr=...
--hold` is in effect (seen through the scheduler's get_last_lr(), which says the lr the
steps run with), then the same step steered. One JSON line: best ns per call of each."""

import json
import sys
import time

import torch

CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
ROUNDS = 15
GROUPS = 4

weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(GROUPS)]
for weight in weights:
    weight.grad = torch.zeros(1)
optimizer = torch.optim.SGD([{"params": [w]} for w in weights], lr=0.0)
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def rounds() -> float:
    step, best = optimizer.step, float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter_ns()
        for _ in range(CALLS):
            step()
        best = min(best, (time.perf_counter_ns() - started) / CALLS)
    return best


optimizer.step()  # the first step publishes lr
unsteered = rounds()
print("ready", flush=True)
deadline = time.monotonic() + 60
while schedule.get_last_lr()[0] == 0.0:
    if time.monotonic() > deadline:
        sys.exit("no change came in 60 s")
    optimizer.step()
    time.sleep(0.01)
steered = rounds()
print(json.dumps({"groups": GROUPS, "unsteered": unsteered, "steered": steered}), flush=True)
