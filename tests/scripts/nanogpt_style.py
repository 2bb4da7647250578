"""A loop in the shape of nanoGPT's train.py, written for these tests: it computes a cosine
lr with a linear warmup and writes it into every param group before every step; AdamW
with a decay and a no-decay group, gradient accumulation under DDP's no_sync, a
GradScaler (disabled on the CPU), gradient clipping; one rank or several on gloo.

It prints the lr each optimizer step ran with (`stepped <n> <lr of group 0> <lr of group
1>`, lr_printer), and at the end a hash of the weights. It stops after --iters, or at the
step where the declared `stop` turns true (on every rank at one step; a replay stops there
too)."""

import argparse
import hashlib
import math
import os
import time

import torch
import torch.distributed as dist
from lr_printer import print_each_step
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import loomrun

parser = argparse.ArgumentParser()
parser.add_argument("--iters", type=int, default=100_000)
parser.add_argument("--accum", type=int, default=2)
parser.add_argument("--step-time", type=float, default=0.0)
args = parser.parse_args()

learning_rate, min_lr, warmup_iters, lr_decay_iters = 6e-3, 6e-4, 20, 800


def get_lr(it: int) -> float:
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


stop = loomrun.param("stop", bool, default=False, doc="end the run after this step")
ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
if ddp:
    dist.init_process_group("gloo")
torch.manual_seed(1337)
vocab, block = 32, 16
model = nn.Sequential(
    nn.Embedding(vocab, 32), nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, vocab)
)
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW(
    [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
    lr=learning_rate,
    betas=(0.9, 0.95),
)
raw = model
if ddp:
    model = DistributedDataParallel(model)
scaler = torch.amp.GradScaler("cpu", enabled=False)
print_each_step(only=optimizer)
data = torch.Generator().manual_seed(7 + (dist.get_rank() if ddp else 0))
for it in range(args.iters):
    if stop.value:
        break
    lr = get_lr(it)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    for micro_step in range(args.accum):
        tokens = torch.randint(vocab, (8, block + 1), generator=data)
        x, y = tokens[:, :-1], tokens[:, 1:]
        syncing = not ddp or micro_step == args.accum - 1
        context = model.no_sync() if not syncing else torch.enable_grad()
        with context:
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
            scaler.scale(loss / args.accum).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if args.step_time:
        time.sleep(args.step_time)
weights = b"".join(p.detach().numpy().tobytes() for p in raw.parameters())
print(f"hash {hashlib.sha256(weights).hexdigest()}", flush=True)
if ddp:
    dist.barrier()
    dist.destroy_process_group()
