"""The optimizer hook without torch: which optimizer counts the steps."""

from __future__ import annotations

import gc

from loomrun.runtime.optim import Optimizers
from loomrun.runtime.worker import Worker


def test_a_replaced_optimizer_hands_the_step_count_to_the_next(mailbox):
    class Optimizer:
        def __init__(self):
            self.param_groups = [{"lr": 0.1}]

    worker = Worker(mailbox)
    optimizers = Optimizers(worker)
    first = Optimizer()
    for _ in range(3):
        optimizers.pre_step(first, (), {})
    assert worker.step == 3
    del first
    gc.collect()
    second = Optimizer()
    for _ in range(2):
        optimizers.pre_step(second, (), {})
    assert worker.step == 5, "the new optimizer counts the steps once the old one is gone"
    assert optimizers.get("lr") == 0.1
