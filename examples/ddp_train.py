"""DistributedDataParallel over gloo on CPU, synthetic data.

Runs unchanged under `torchrun --nproc-per-node 2 examples/ddp_train.py` and under
`loomrun --replicas 2 examples/ddp_train.py`. With `--save PREFIX`, every rank writes
its final state dict to PREFIX.rank<N>.pt, so the ranks can be compared bitwise.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--step-time", type=float, default=0.0, help="sleep per step, seconds")
    parser.add_argument("--print-every", type=int, default=50)
    parser.add_argument("--save", default=None, help="write PREFIX.rank<N>.pt at the end")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1234 + rank)  # different data per rank; DDP syncs the weights
    model = DistributedDataParallel(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    true_w = torch.linspace(-1, 1, 16).unsqueeze(1)

    for step in range(1, args.steps + 1):
        x = torch.randn(64, 16)
        y = x @ true_w
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % args.print_every == 0 or step == args.steps):
            lr = optimizer.param_groups[0]["lr"]
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.6g}  world {world}", flush=True)
        if args.step_time:
            time.sleep(args.step_time)

    if args.save:
        torch.save(model.module.state_dict(), f"{args.save}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print("done", flush=True)


if __name__ == "__main__":
    main()
