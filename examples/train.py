"""A small plain-PyTorch training loop on synthetic data.

Runs as is under `python examples/train.py` and under `loomrun examples/train.py --replicas 4`,
where `loomrun set lr=0.002` changes its learning rate between two steps: no loomrun code
is needed for that. The one loomrun call here, `loomrun.report`, publishes the loss to
`loomrun watch`; outside loomrun it does nothing.
"""

import argparse
import os
import time

import torch
from torch import nn

import loomrun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--scheduler", choices=["none", "step", "cosine"], default="none")
    parser.add_argument("--step-time", type=float, default=0.0, help="sleep per step, seconds")
    parser.add_argument("--print-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # Replicas here are independent runs of one task (no DDP): each gets its own seed for
    # its initial weights and its batches; the task itself is the same for all of them.
    torch.manual_seed(args.seed + int(os.environ.get("RANK", "0")))
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    scheduler = None
    if args.scheduler == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)
    elif args.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    true_w = torch.randn(16, 1, generator=torch.Generator().manual_seed(1234))
    losses = []

    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, 16)
        y = x @ true_w + 0.1 * torch.randn(args.batch, 1)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_value = loss.item()
        losses.append(loss_value)
        loomrun.report(loss=loss_value)
        if step % args.print_every == 0 or step == args.steps:
            lr = optimizer.param_groups[0]["lr"]
            print(f"step {step:5d}  loss {loss_value:.4f}  lr {lr:.6g}", flush=True)
        if args.step_time:
            time.sleep(args.step_time)
    tail = losses[-50:]
    print(f"final loss {sum(tail) / len(tail):.6f} (the mean of the last {len(tail)} steps)")


if __name__ == "__main__":
    main()
