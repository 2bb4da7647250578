"""Window: one metric's values between two statuses (how many, their sum, min and max), as
the worker folds them (runtime.metrics) and the rules take them across statuses and ranks
(control.rules). A NaN among the values is kept in min and max, where min() and max()
would skip it. A GPU's window stays on the GPU until read (no sync to merge it)."""

from __future__ import annotations

import math


class Window:
    __slots__ = ("count", "total", "low", "high")

    def __init__(self, count: int, total, low, high):
        self.count, self.total, self.low, self.high = count, total, low, high

    @classmethod
    def of_pb(cls, window) -> Window:
        """From a status's MetricWindow."""
        return cls(window.count, window.mean * window.count, window.min, window.max)

    def merged(self, other: Window) -> Window:
        if on_device(self.total) or on_device(other.total):  # no sync to compare them
            import torch

            low, high = torch.minimum, torch.maximum  # which keep a NaN
        else:
            low, high = _low, _high
        return Window(
            self.count + other.count, self.total + other.total,
            low(self.low, other.low), high(self.high, other.high),
        )  # fmt: skip

    def read(self) -> Window:
        """In numbers (a GPU's window synced here, once)."""
        return Window(self.count, float(self.total), float(self.low), float(self.high))

    def to_pb(self, window) -> None:
        """Into a MetricWindow (a window read already)."""
        window.count, window.mean = self.count, self.total / self.count
        window.min, window.max = self.low, self.high


def merged(windows: list[dict[str, Window]]) -> dict[str, Window]:
    """Per key, the windows of several statuses as one."""
    out: dict[str, Window] = {}
    for each in windows:
        for key, window in each.items():
            out[key] = window if key not in out else out[key].merged(window)
    return out


def on_device(value) -> bool:
    return getattr(value, "is_cuda", False) or getattr(value, "is_xpu", False)


def _low(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else min(a, b)


def _high(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)
