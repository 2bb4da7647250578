"""An optimizer that sets lr inside its own step, from its own state, once the declared
parameter `own_lr` is true: loomrun cannot keep a steered lr in effect there."""

import time

import torch
from torch import nn

import loomrun

own_lr = loomrun.param("own_lr", bool, default=False, doc="the optimizer writes its own lr")


class OwnSchedule(torch.optim.Optimizer):
    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})
        self.t = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.t += 1
        for group in self.param_groups:
            if own_lr.value:
                group["lr"] = 0.25
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])


torch.manual_seed(0)
model = nn.Linear(4, 1)
optimizer = OwnSchedule(model.parameters())
while True:
    loss = model(torch.randn(8, 4)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    time.sleep(0.005)
