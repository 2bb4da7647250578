"""Plain torch, no loomrun import: prints `loss <step> <value>` for every step, the loss
as the script knows it (unscaled, with --amp)."""

import argparse
import time

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100_000)
parser.add_argument("--amp", action="store_true", help="scale the loss with a GradScaler")
args = parser.parse_args()

torch.manual_seed(0)
model = nn.Linear(4, 1)
optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
scaler = torch.amp.GradScaler("cpu", enabled=args.amp)
for step in range(1, args.steps + 1):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    print(f"loss {step} {loss.item()!r}", flush=True)
    time.sleep(0.005)
