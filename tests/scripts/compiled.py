"""A model under torch.compile (inductor, on the CPU), an SGD optimizer and a LambdaLR.
Prints `stepped <n> <lr>`, the lr each step ran with (a global step post-hook registered
before loomrun's)."""

import sys
import time

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

count = [0]


def stepped(optimizer, *_):
    count[0] += 1
    print(f"stepped {count[0]} {optimizer.param_groups[0]['lr']!r}", flush=True)


register_optimizer_step_post_hook(stepped)
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
