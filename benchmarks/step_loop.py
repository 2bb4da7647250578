"""A training loop of ~1 ms CPU steps that prints its own steady-state steps per second."""

import argparse
import time

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=3000)
parser.add_argument("--warmup", type=int, default=200)
parser.add_argument("--quiet", action="store_true", help="print nothing (runs until stopped)")
args = parser.parse_args()

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(64, 128), torch.randn(64, 1)
for step in range(args.warmup + args.steps):
    if step == args.warmup:
        started = time.perf_counter()
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
if not args.quiet:
    print(f"steps_per_sec {args.steps / (time.perf_counter() - started):.2f}")
