"""Structured parameters in a real torch loop: a nested dataclass, a dict[str, float], a
TypedDict, a list of dataclasses and a handler that takes a dataclass. The loss depends on
them, so a replay that applies them at the same steps ends with the same weights. Each time
a value the script sees changes, it prints `seen STEP NAME JSON`, and it checks that every
value is a new instance of its own types."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from typing import Annotated, TypedDict

import torch
from torch import nn

import loomrun

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100_000)
parser.add_argument("--step-time", type=float, default=0.005)
parser.add_argument("--crash-at-step", type=int, default=0)
args = parser.parse_args()


@dataclasses.dataclass
class Warmup:
    steps: Annotated[int, loomrun.Field(min=0, doc="steps of linear warm-up")] = 100
    start: Annotated[float, loomrun.Field(min=0.0, max=1.0, doc="first factor")] = 0.1


@dataclasses.dataclass
class Sched:
    warmup: Warmup = dataclasses.field(default_factory=Warmup)
    peak: Annotated[float, loomrun.Field(min=0.0, doc="the factor after warm-up")] = 1.0
    name: str = "linear"


class Mix(TypedDict):
    alpha: float
    on: bool


@dataclasses.dataclass
class Block:
    width: Annotated[int, loomrun.Field(min=1, max=64)] = 8


sched = loomrun.param("sched", Sched, doc="the loss schedule")
aug = loomrun.param("aug", dict[str, float], default={"p": 0.5, "x.y": 1.0})
mix = loomrun.param("mix", Mix, default={"alpha": 0.2, "on": True})
blocks = loomrun.param("blocks", list[Block], default=[Block(8), Block(16)])
heads: list[Warmup] = []
HEAD = Warmup(steps=5)


@loomrun.handler("head")
def set_head(cfg: Warmup = HEAD):
    """the head's own warm-up"""
    heads.append(cfg)


def plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def well_typed() -> bool:
    s = sched.value
    return (
        isinstance(s, Sched)
        and isinstance(s.warmup, Warmup)
        and all(isinstance(b, Block) for b in blocks.value)
        and isinstance(mix.value, dict)
        and all(isinstance(h, Warmup) for h in heads)
    )


torch.manual_seed(0)
model = nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
data = torch.Generator().manual_seed(7)
seen: dict[str, tuple] = {}
instances: dict[str, object] = {}
for step in range(1, args.steps + 1):
    x = torch.randn(8, 4, generator=data)
    s = sched.value
    factor = s.peak * min(1.0, s.warmup.start + step / max(1, s.warmup.steps))
    weight = aug.value.get("p", 0.0) + mix.value["alpha"] + blocks.value[0].width / 8
    loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)) * factor * weight
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    now = {
        "sched": sched.value, "aug": aug.value, "mix": mix.value,
        "blocks": [plain(b) for b in blocks.value], "head": heads[-1] if heads else None,
    }  # fmt: skip
    for name, value in now.items():
        shown = json.dumps(plain(value), sort_keys=True)
        if seen.get(name) != shown:
            if name in instances and value is instances[name] and name != "blocks":
                print(f"SAME INSTANCE {name} at step {step}", flush=True)
            seen[name], instances[name] = shown, value
            print(f"seen {step} {name} {shown}", flush=True)
    if not well_typed():
        print(f"WRONG TYPE at step {step}", flush=True)
    if step == args.crash_at_step and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        os._exit(3)  # the first run only: its restart goes on
    time.sleep(args.step_time)
weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
print(f"hash {hashlib.sha256(weights).hexdigest()}", flush=True)
