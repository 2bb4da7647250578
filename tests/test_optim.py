"""The optimizer hook and the built-in lr with real torch optimizers and every LR scheduler
class torch ships: a live change must survive the schedule and keep the groups' ratio.

The worker here is a real runtime Worker on its own mailbox (no supervisor owns it), with
the real global optimizer pre-hook installed, as in a worker process."""

from __future__ import annotations

import gc
import inspect

import pytest
import torch
import torch.optim.lr_scheduler as L

from loomrun.runtime.optim import Optimizers
from loomrun.runtime.worker import Worker


@pytest.fixture
def optimizers(mailbox):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    found = Optimizers(Worker(mailbox))
    handle = register_optimizer_step_pre_hook(found.pre_step)
    original = L.LRScheduler.__init__

    def tracked(scheduler, *args, **kwargs):
        original(scheduler, *args, **kwargs)
        found.schedulers.add(scheduler)

    L.LRScheduler.__init__ = tracked
    yield found
    L.LRScheduler.__init__ = original
    handle.remove()


def two_groups(lr=0.1, optimizer=torch.optim.SGD, **kwargs):
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    return optimizer([{"params": [a]}, {"params": [b], "lr": lr / 10}], lr=lr, **kwargs)


def train(optimizer, steps: int, scheduler=None) -> None:
    for _ in range(steps):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        optimizer.step()
        if scheduler is not None:
            if isinstance(scheduler, L.ReduceLROnPlateau):
                scheduler.step(1.0)  # a loss that never improves: it reduces, every time
            else:
                scheduler.step()


def test_a_replaced_optimizer_hands_the_step_count_to_the_next(optimizers):
    first = two_groups()
    train(first, 3)
    assert optimizers.worker.step == 3
    del first
    gc.collect()
    second = two_groups(lr=0.5)
    train(second, 2)
    assert optimizers.worker.step == 5, "the new optimizer counts the steps once the old is gone"
    assert optimizers.get("lr") == 0.5


def test_lr_keeps_the_ratio_and_lr_n_sets_one_group(optimizers):
    optimizer = two_groups(lr=0.1)
    train(optimizer, 1)
    assert {"lr", "lr.0", "lr.1", "momentum"} <= set(optimizers.worker.targets)
    optimizers.put("lr", 0.3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.3, 0.03])
    assert optimizer.param_groups[0]["lr"] == 0.3, "the first group gets exactly the value"
    optimizers.put("lr.1", 0.05)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.3, 0.05])
    assert optimizers.get("lr.1") == 0.05
    optimizers.put("momentum", 0.5)
    assert {g["momentum"] for g in optimizer.param_groups} == {0.5}


def test_a_single_group_has_no_lr_n(optimizers):
    weight = torch.nn.Parameter(torch.ones(1))
    train(torch.optim.Adam([weight], lr=0.1), 1)
    assert "lr.0" not in optimizers.worker.targets and "betas" in optimizers.worker.targets


# Every scheduler class in torch.optim.lr_scheduler that keeps lr state, built for a test.
SCHEDULERS = {
    "LambdaLR": lambda o: L.LambdaLR(o, lambda s: 1.0 / (1 + 0.1 * s)),
    "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, lambda s: 0.95),
    "StepLR": lambda o: L.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[4, 9, 14], gamma=0.5),
    "ConstantLR": lambda o: L.ConstantLR(o, factor=0.5, total_iters=12),
    "LinearLR": lambda o: L.LinearLR(o, start_factor=0.2, total_iters=16),
    "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.9),
    "SequentialLR": lambda o: L.SequentialLR(
        o, [L.ConstantLR(o, factor=0.5, total_iters=4), L.ExponentialLR(o, gamma=0.9)], [6]
    ),
    "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=30, power=2.0),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=12),
    "ChainedScheduler": lambda o: L.ChainedScheduler(
        [L.ConstantLR(o, factor=0.5, total_iters=8), L.ExponentialLR(o, gamma=0.9)]
    ),
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, factor=0.5, patience=1),
    "CyclicLR": lambda o: L.CyclicLR(o, base_lr=[0.01, 0.001], max_lr=[0.1, 0.01], step_size_up=4),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=5),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=[0.1, 0.01], total_steps=40),
}


def test_every_scheduler_torch_ships_is_covered():
    shipped = {
        name for name, cls in vars(L).items()
        if inspect.isclass(cls) and issubclass(cls, L.LRScheduler)
        and cls not in (L.LRScheduler, L._LRScheduler)
    }  # fmt: skip
    assert shipped <= set(SCHEDULERS), f"add to SCHEDULERS: {sorted(shipped - set(SCHEDULERS))}"


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_live_lr_change_survives_the_scheduler(optimizers, name):
    """After lr is scaled by k at step n, every later lr of every group is k times what the
    same schedule gives without the change: the schedule continues from the new value."""
    k, before, after = 3.0, 7, 25
    reference = two_groups(lr=0.1)
    scheduler = SCHEDULERS[name](reference)
    train(reference, before, scheduler)
    expected = []
    for _ in range(after):
        train(reference, 1, scheduler)
        expected.append([k * g["lr"] for g in reference.param_groups])
    del reference, scheduler  # the runtime must know only the steered optimizer
    gc.collect()

    steered = two_groups(lr=0.1)
    scheduler = SCHEDULERS[name](steered)
    train(steered, before, scheduler)
    optimizers.put("lr", optimizers.get("lr") * k)
    for want in expected:
        train(steered, 1, scheduler)
        assert [g["lr"] for g in steered.param_groups] == pytest.approx(want, rel=1e-9)


def test_the_scripts_own_lr_is_the_one_it_gave_before_any_schedule(optimizers):
    optimizer = two_groups(lr=0.1)
    L.LambdaLR(optimizer, lambda s: min(1.0, s / 10))  # a warm-up: lr starts at 0
    train(optimizer, 1)
    targets = optimizers.worker.targets
    assert targets["lr"].spec.default == 0.1 and targets["lr.1"].spec.default == 0.01


def test_an_lr_that_is_no_plain_number_steps_all_the_same(optimizers):
    import numpy as np

    optimizer = two_groups(lr=np.float32(0.1))
    train(optimizer, 3)  # no error from the hook: the value is only left out of the schema
    assert optimizers.worker.step == 3 and optimizers.worker.targets["lr"].spec.default is None
