"""One rank of a process group for benchmarks/group.py: gloo, a tiny model and a real
torch.optim step every STEP_TIME seconds. No collective of its own: the ranks meet only
at loomrun's agreement points, where they agree in band on the step of a change."""

import sys
import time

import torch
import torch.distributed as dist

STEP_TIME = float(sys.argv[1]) if len(sys.argv) > 1 else 0.05
torch.set_num_threads(1)
dist.init_process_group("gloo")
torch.manual_seed(dist.get_rank())
model = torch.nn.Linear(8, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(16, 8), torch.randn(16, 1)
while True:
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    time.sleep(STEP_TIME)
