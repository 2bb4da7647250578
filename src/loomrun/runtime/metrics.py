"""The script's metrics as it reports them, and the step rate, for the worker's status.

A metric is kept as reported (a tensor stays a tensor) and made a number only when a
status is due, so that reporting a GPU loss every step does not sync the device every
step; a tensor on a GPU is read at most once a second, and never while a CUDA graph is
being captured."""

from __future__ import annotations

import functools
from typing import Any

DEVICE_READ_INTERVAL = 1.0  # seconds between reads of a metric that lives on a GPU
RATE_AFTER = 0.1  # the first rate, this long after the first step


class Metrics:
    """Owned by the Worker: `report` takes the script's (and the tracked loss's) values,
    `numbers` and `rate` make a status of them."""

    def __init__(self, warn):
        self.warn = warn
        self.reported: dict[str, Any] = {}
        # The script reports a loss of its own: the one torch's backward saw is not taken.
        self.own_loss = False
        self._device_numbers: dict[str, float] = {}  # GPU metrics as last read
        self._next_device_read = 0.0
        self._rate_mark: tuple[float, int] | None = None
        self._rate = 0.0

    def report(self, metrics: dict[str, Any]) -> None:
        if "loss" in metrics:
            self.own_loss = True
        self.reported.update(metrics)

    def numbers(self, now: float, final: bool = False) -> dict[str, float]:
        """The metrics as numbers; a GPU's as last read, unless one is due (or `final`)."""
        numbers = {}
        read_devices = final or now >= self._next_device_read
        for key, value in list(self.reported.items()):
            on_device = getattr(value, "is_cuda", False) or getattr(value, "is_xpu", False)
            if on_device and not (read_devices and _may_sync(value)):
                if key in self._device_numbers:
                    numbers[key] = self._device_numbers[key]
                continue
            try:
                numbers[key] = float(value)
            except (TypeError, ValueError, RuntimeError):
                del self.reported[key]
                self.warn(f"metric {key!r} is not a number ({value!r}); it is left out")
                continue
            if on_device:
                self._device_numbers[key] = numbers[key]
        if read_devices:
            self._next_device_read = now + DEVICE_READ_INTERVAL
        return numbers

    def rate(self, now: float, step: int) -> float:
        """Steps per second, counted from the first step (not from start-up), over about a
        second; the first one a tenth of a second after the first step."""
        if self._rate_mark is None:
            if step > 0:
                self._rate_mark = (now, step)
            return self._rate
        mark_time, mark_step = self._rate_mark
        elapsed = now - mark_time
        if elapsed >= 1.0 or (self._rate == 0.0 and elapsed >= RATE_AFTER):
            self._rate = (step - mark_step) / elapsed
            self._rate_mark = (now, step)
        return self._rate


def _may_sync(value) -> bool:
    """Reading a CUDA tensor while a CUDA graph is captured would break the capture."""
    import torch

    capturing = getattr(torch.cuda, "is_current_stream_capturing", None)
    return not (value.is_cuda and capturing is not None and capturing())


def track_loss(metrics: Metrics) -> None:
    """A script that reports no loss itself has one all the same: the scalar it calls
    `.backward()` on (under a GradScaler, or a subclass such as FSDP's ShardedGradScaler,
    the loss before scaling). A detached reference is kept (the graph is not: a custom
    autograd Function may hold tensors on it); the worker reads its value when a status
    is due, at most once a second."""
    import torch

    scaled: list = [None, None]  # the last scaled loss, and the loss it was scaled from

    def tracked_backward(self, *args, **kwargs):
        if not metrics.own_loss and self.dim() == 0:
            loss = self
            if self is scaled[0]:
                loss = scaled[1]
            metrics.reported["loss"] = loss.detach()
        scaled[0] = scaled[1] = None
        return backward(self, *args, **kwargs)

    def tracking(scale):
        @functools.wraps(scale)
        def tracked_scale(self, outputs):
            out = scale(self, outputs)
            if not metrics.own_loss and isinstance(outputs, torch.Tensor) and outputs.dim() == 0:
                scaled[0], scaled[1] = out, outputs
            return out

        return tracked_scale

    backward = torch.Tensor.backward
    torch.Tensor.backward = functools.wraps(backward)(tracked_backward)
    scaler = getattr(getattr(torch, "amp", None), "GradScaler", None)  # torch >= 2.3
    if scaler is None:
        return
    kinds, seen = [scaler], []
    while kinds:  # the scaler and those of its subclasses that scale their own way
        kind = kinds.pop()
        seen.append(kind)
        kinds.extend(kind.__subclasses__())
        if "scale" in kind.__dict__:
            kind.scale = tracking(kind.scale)
    made = scaler.__dict__.get("__init_subclass__")

    def init_subclass(cls, **kwargs):  # one defined later (FSDP's, when imported)
        if made is not None:
            made.__func__(cls, **kwargs)
        else:
            super(scaler, cls).__init_subclass__(**kwargs)
        if "scale" in cls.__dict__:
            cls.scale = tracking(cls.scale)

    scaler.__init_subclass__ = classmethod(init_subclass)
