"""A seeded DDP run (gloo, CPU): its final weights depend only on its seed and on how it
was steered. Every rank prints a hash of them at the end."""

import argparse
import hashlib
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import loomrun

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=400)
parser.add_argument("--step-time", type=float, default=0.0)
parser.add_argument("--trace", action="store_true", help="print each step's optimizer and loss")
args = parser.parse_args()

scale = loomrun.param("loss_scale", float, default=1.0, min=0.0, doc="multiplies the loss")
dist.init_process_group("gloo")
torch.manual_seed(0)
model = DistributedDataParallel(nn.Linear(8, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
data = torch.Generator().manual_seed(100 + dist.get_rank())
for step in range(1, args.steps + 1):
    x = torch.randn(16, 8, generator=data)
    loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)) * scale.value
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()  # a switch at this step's boundary: this update is the new kind's
    if args.trace:
        print(f"step {step} {type(optimizer).__name__} loss {loss.item():.6f}", flush=True)
    time.sleep(args.step_time)
weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
print(f"hash {hashlib.sha256(weights).hexdigest()}", flush=True)
dist.barrier()
dist.destroy_process_group()
