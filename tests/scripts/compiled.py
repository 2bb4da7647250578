"""A model under torch.compile (inductor, on the CPU), an SGD optimizer and a LambdaLR.
Prints `stepped <n> <lr>`, the lr each step ran with (lr_printer)."""

import sys
import time

import torch
from lr_printer import print_each_step
from torch import nn

print_each_step()
torch.manual_seed(0)
model = torch.compile(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.01 * s))
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 400
for _ in range(steps):
    x = torch.randn(16, 8)
    loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
    time.sleep(0.005)
