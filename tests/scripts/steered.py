"""A training loop that prints the lr each optimizer step used: `used <step> <lr>`.

The lr is read by a step post-hook of the optimizer's own, which runs right after the step
and before loomrun's global one gives the script its own value back."""

import argparse
import os
import sys
import time

import torch
from torch import nn

import loomrun

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=400)
parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
parser.add_argument("--scheduler", choices=["none", "step", "lambda"], default="none")
parser.add_argument("--step-time", type=float, default=0.005)
parser.add_argument("--crash-at-step", type=int, default=0)
parser.add_argument("--groups", type=int, default=1, help="param groups, lr 0.1, 0.01, ...")
parser.add_argument("--slow-rank", type=int, default=-1, help="this rank steps 10x slower")
parser.add_argument("--quiet", action="store_true", help="print no line per step")
parser.add_argument("--stop-rank", type=int, default=-1, help="this rank ends (exit 0) at...")
parser.add_argument("--stop-at", type=int, default=0, help="...this step")
args = parser.parse_args()

torch.manual_seed(0)
model = nn.Linear(4, 1)
groups = [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.01}][: args.groups]
if args.groups == 1:
    groups = [{"params": model.parameters()}]
if args.optimizer == "sgd":
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
else:
    optimizer = torch.optim.Adam(groups, lr=0.1)
scheduler = None
if args.scheduler == "step":
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)
elif args.scheduler == "lambda":
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.01 * s))

stepped_with: list = []
optimizer.register_step_post_hook(
    lambda o, args, kwargs: stepped_with.__setitem__(slice(None), [g["lr"] for g in o.param_groups])
)

batch = loomrun.param("batch", int, default=8, min=1, doc="examples per step")
restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
for step in range(1, args.steps + 1):
    loss = model(torch.randn(batch.value, 4)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if not args.quiet:
        lrs = " ".join(repr(lr) for lr in stepped_with)
        print(f"used {step} {lrs} batch {batch.value}", flush=True)
    if scheduler is not None:
        scheduler.step()
    if step == args.crash_at_step and not restarted:
        sys.exit(7)
    if step == args.stop_at and os.environ.get("RANK") == str(args.stop_rank):
        break
    slow = os.environ.get("RANK") == str(args.slow_rank)
    time.sleep(args.step_time * (10 if slow else 1))
