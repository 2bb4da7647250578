"""A seeded regression whose data turns bad for a few steps: from --bad-from, for --bad-for
steps, the targets are 8 times too large, and SGD with momentum carries the damage on for
long after. A loop in the usual shape (DDP on gloo when launched with several ranks, a
BatchNorm, dropout, a warm-up schedule), written for the snapshot, rollback and copy
tests (--independent: replicas of their own, each seeded by its rank).

Each step prints `step <n> hash <h> params <p> loss <l> lr <lr> sched <e>`: n counts the
optimizer steps from 1 (as loomrun counts them); h hashes the model's state_dict before
that step's optimizer step (after its forward, which moved the BatchNorm's running
statistics), p its parameters alone; lr is the param group's (a steered value is
loomrun's), e the scheduler's own count of its steps. It stops after --iters, or at the
step where the declared `stop` turns true; at the end
it prints `final <mean loss of the last 20 steps> hash <h> params <p>` (under DDP the
ranks' BatchNorm statistics differ: each rank's forward moves them with its own batch)."""

import argparse
import hashlib
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import loomrun

parser = argparse.ArgumentParser()
parser.add_argument("--iters", type=int, default=100_000)
parser.add_argument("--bad-from", type=int, default=60)
parser.add_argument("--bad-for", type=int, default=4)
parser.add_argument("--step-time", type=float, default=0.0)
parser.add_argument("--independent", action="store_true", help="replicas of their own, no DDP")
args = parser.parse_args()

stop = loomrun.param("stop", bool, default=False, doc="end the run after this step")
ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.independent
if ddp:
    dist.init_process_group("gloo")
rank = dist.get_rank() if ddp else int(os.environ.get("RANK", "0"))
torch.manual_seed(rank if args.independent else 0)
model = nn.Sequential(
    nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.05), nn.Linear(32, 1)
)
raw = model
if ddp:
    model = DistributedDataParallel(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
truth = torch.randn(8, 1, generator=torch.Generator().manual_seed(1))


def digest(tensors=None) -> str:
    tensors = raw.state_dict().values() if tensors is None else tensors
    blob = b"".join(t.detach().contiguous().numpy().tobytes() for t in tensors)
    return hashlib.sha256(blob).hexdigest()[:16]


losses = []
for it in range(1, args.iters + 1):
    if stop.value:
        break
    data = torch.Generator().manual_seed(1000 * it + rank)
    x = torch.randn(256, 8, generator=data)
    y = x @ truth + 0.1 * torch.randn(256, 1, generator=data)
    if args.bad_from <= it < args.bad_from + args.bad_for:
        y = y * 8
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    weights, lr = digest(raw.parameters()), optimizer.param_groups[0]["lr"]
    print(
        f"step {it} hash {digest()} params {weights} loss {loss.item():.6f} lr {lr!r} "
        f"sched {scheduler.last_epoch}",
        flush=True,
    )
    optimizer.step()
    scheduler.step()
    losses.append(loss.item())
    if args.step_time:
        time.sleep(args.step_time)
tail = losses[-20:]
print(f"final {sum(tail) / len(tail):.6f} hash {digest()} params {digest(raw.parameters())}")
if ddp:
    dist.destroy_process_group()
