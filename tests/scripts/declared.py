"""Explicit API: declared params, function and method handlers, loomrun.step without torch."""

import enum
import time
from typing import Literal

import loomrun


class Mode(enum.Enum):
    FAST = 1
    CAREFUL = 2


batch = loomrun.param("batch", int, default=32, min=1, max=4096, doc="examples per step")
mode = loomrun.param("mode", Mode, default=Mode.FAST)
note = loomrun.param("note", str, default="")


@loomrun.handler("temperature", min=0.0)
def set_temperature(value: float = 1.0):
    """sampling temperature"""
    print(f"temperature -> {value!r}", flush=True)


@loomrun.handler("batch_size")
def set_batch_size(n: int = 32):
    """examples per step, checked by the handler itself"""
    if n <= 0:
        raise ValueError(f"batch_size must be positive, not {n}")
    print(f"batch_size -> {n}", flush=True)


@loomrun.handler("explode")
def explode(value: bool):
    raise RuntimeError("this handler always fails")


class Model:
    @loomrun.handler("dropout")
    def set_dropout(self, p: Literal["low", "high"] = "low"):
        self.dropout = p
        print(f"dropout -> {p}", flush=True)


model = Model()
for step in range(1, 100_000):
    loomrun.step(loss=1.0 / step)
    if step % 20 == 0:
        print(f"step {step} batch {batch.value} mode {mode.value.name}", flush=True)
    time.sleep(0.005)
