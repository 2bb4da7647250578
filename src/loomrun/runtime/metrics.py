"""The script's metrics as it reports them, and the step rate, for the worker's status.

A metric is kept as reported (a tensor stays a tensor) and made a number only when a
status is due, so that reporting a GPU loss every step does not sync the device every
step; a tensor on a GPU is read at most once a second, and never while a CUDA graph is
being captured.

Between two statuses each metric's values are kept too (the values, folded into a count,
a sum, a min and a max past FOLD_AT of them), and the status gives their mean, min and
max: a spike of a few fast steps between two statuses still shows, for a rule to read."""

from __future__ import annotations

import functools
import math
from typing import Any

from loomrun.metricwindow import Window, merged, on_device

DEVICE_READ_INTERVAL = 1.0  # seconds between reads of a metric that lives on a GPU
RATE_AFTER = 0.1  # the first rate, this long after the first step
FOLD_AT = 1024  # values of one metric kept between two statuses before they are folded
FOLD_TENSORS_AT = 64  # a GPU's tensors: folded on the GPU, a few at a time
UNREAD_KEPT = 64  # statuses' windows kept for a supervisor that has not read them


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
        self._since: dict[str, list] = {}  # key -> its values since the last status
        self._folded: dict[str, Window] = {}  # key -> those folded, past FOLD_AT
        # The statuses written that the supervisor has not read: (the status slot's
        # number, its step, key -> Window), oldest first.
        self._unread: list[tuple[int, int, dict[str, Window]]] = []
        self._segment: dict[str, Window] = {}  # of the status being written
        self.window_step = 0  # the step of the status the supervisor read last

    def report(self, metrics: dict[str, Any]) -> None:
        if "loss" in metrics:
            self.own_loss = True
        for key, value in metrics.items():
            self.put(key, value)

    def put(self, key: str, value: Any) -> None:
        self.reported[key] = value
        if getattr(value, "is_cpu", False):  # a CPU tensor, read now: no sync, 0.2 us
            try:  # noqa: SIM105 - contextlib.suppress costs 0.3 us on every backward
                value = float(value)
            except (TypeError, ValueError, RuntimeError):
                pass  # not one number: numbers() says so
        values = self._since.get(key)
        if values is None:
            self._since[key] = [value]
            return
        values.append(value)
        if len(values) >= (FOLD_TENSORS_AT if hasattr(value, "detach") else FOLD_AT):
            self._fold(key, values)

    def _fold(self, key: str, values: list) -> None:
        """The values kept, folded into their Window; a GPU's on the GPU (no sync). Values
        that cannot be (not numbers) are left out of the window, said once."""
        try:
            if hasattr(values[-1], "detach"):  # tensors: one stack, where they are
                import torch

                kept = torch.stack(values).double()
                window = Window(len(values), kept.sum(), kept.min(), kept.max())
                if not on_device(values[-1]):  # a GPU's waits for a read that may sync
                    window = window.read()
            else:
                numbers = [float(v) for v in values]
                low, high = min(numbers), max(numbers)
                if any(math.isnan(n) for n in numbers):  # min and max would skip it
                    low = high = math.nan
                window = Window(len(numbers), sum(numbers), low, high)
        except (TypeError, ValueError, RuntimeError) as error:
            self.warn(f"metric {key!r} has values that are not numbers ({error}); its "
                      "mean, min and max leave them out")  # fmt: skip
            return
        finally:
            values.clear()
        held = self._folded.get(key)
        self._folded[key] = window if held is None else held.merged(window)

    def numbers(self, now: float, final: bool = False, read: int = 0) -> tuple[dict, dict]:
        """The metrics as numbers, and each one's Window since the status the supervisor
        read last (numbered `read`); a GPU's as last read, unless one is due (or
        `final`): its values wait for that read. `written` numbers this status."""
        numbers, windows = {}, {}
        read_devices = final or now >= self._next_device_read
        for key, value in list(self.reported.items()):
            device = on_device(value)
            if device and not (read_devices and _may_sync(value)):
                if key in self._device_numbers:
                    numbers[key] = self._device_numbers[key]
                continue
            try:
                numbers[key] = float(value)
            except (TypeError, ValueError, RuntimeError):
                del self.reported[key]
                self._since.pop(key, None)
                self.warn(f"metric {key!r} is not a number ({value!r}); it is left out")
                continue
            if self._since.get(key):
                self._fold(key, self._since[key])
            if key in self._folded:  # read now, while a GPU's may be
                windows[key] = self._folded.pop(key).read()
            if device:
                self._device_numbers[key] = numbers[key]
        if read_devices:
            self._next_device_read = now + DEVICE_READ_INTERVAL
        self._segment = windows
        for seq, step, _ in self._unread:
            if seq <= read:
                self.window_step = step
        self._unread = [entry for entry in self._unread if entry[0] > read]
        if len(self._unread) > UNREAD_KEPT:  # nobody reads (no control plane): one for all
            seq, step, _ = self._unread[-1]
            self._unread = [(seq, step, merged([w for _, _, w in self._unread]))]
        return numbers, merged([*(w for _, _, w in self._unread), windows])

    def written(self, seq: int, step: int) -> None:
        """The status just made is in the mailbox under number `seq` (0: it is not)."""
        if seq:
            self._unread.append((seq, step, self._segment))
        self._segment = {}

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
            metrics.put("loss", loss.detach())
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
