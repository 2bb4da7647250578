"""Metric history: each replica's reported metrics, lr and steps/s, as a bounded series.

A curve of a run of days needs the run's whole shape, not its last minutes. A series keeps
at most POINTS points. When full, every other point goes, and from then on a point is
taken only once the step has moved on by the spacing of the points kept, so the points
stay evenly spread over the steps of the whole run. Points come from the statuses the
pump reads (about four a second per replica), one per step at most.

Memory per replica: 8 bytes per point for the step, 8 for the time and 8 per column, at
most COLUMNS columns: (2 + columns) x 8 x POINTS bytes, 80 KiB for loss, lr and steps/s
(`benchmarks/records.py` measures it). At the limits a series is about 560 KB on the
wire, under NATS's default 1 MB message.

A value the script did not report at a point is missing (NaN in the arrays, null in
JSON); a NaN the script did report is kept apart from that (a NaN of its own bits in the
arrays, "nan" in JSON, like "inf" and "-inf"), so a diverging run shows as one.

A client asks a supervisor for a replica's series on `loomrun.{job}.history.{replica}`;
at job end each supervisor writes its replicas' series next to the change ledger.
"""

from __future__ import annotations

import json
import math
import os
from array import array
from pathlib import Path

from loomrun._proto import loomrun_pb2 as pb
from loomrun.output import say
from loomrun.records import AXES, REPORTED_NAN, series_dict, write_whole

POINTS = 2048  # per replica, the most; LOOMRUN_HISTORY_POINTS sets fewer (at least 16)
COLUMNS = 32  # metric names per replica; more are left out of the history (not of status)
MISSING = math.nan


class Series:
    """One replica's history: steps, times and one column of values per metric."""

    def __init__(self, limit: int = POINTS):
        self.limit = max(16, limit - limit % 2)  # even: thinning keeps the newest point
        self.spacing = 1.0  # in steps: a point closer to the last one is not taken
        self.steps = array("q")
        self.times = array("d")
        self.columns: dict[str, array] = {}
        self.left_out = 0  # values of metrics past COLUMNS, not kept

    def add(self, step: int, when: float, values: dict[str, float]) -> bool:
        """Take a point; False when the step has not moved on by the spacing. A step
        behind the last (a restart from a checkpoint) starts a new stretch of the run."""
        if self.steps:
            last = self.steps[-1]
            if last <= step < last + self.spacing:
                return False
        count = len(self.steps)
        self.steps.append(step)
        self.times.append(when)
        for name, value in values.items():
            column = self.columns.get(name)
            if column is None:
                if len(self.columns) >= COLUMNS:
                    self.left_out += 1
                    continue
                column = self.columns[name] = array("d", [MISSING]) * count
            column.append(REPORTED_NAN if math.isnan(value) else value)
        for column in self.columns.values():
            if len(column) == count:
                column.append(MISSING)
        if len(self.steps) > self.limit:
            self._thin()
        return True

    def _thin(self) -> None:
        """Every other point goes; with an even limit the count is odd here, so the first
        and the newest stay."""
        self.steps = self.steps[::2]
        self.times = self.times[::2]
        for name, column in self.columns.items():
            self.columns[name] = column[::2]
        gap = (self.steps[-1] - self.steps[0]) / (len(self.steps) - 1)
        self.spacing = max(2 * self.spacing, gap)

    def nbytes(self) -> int:
        arrays = [self.steps, self.times, *self.columns.values()]
        return sum(a.itemsize * a.buffer_info()[1] for a in arrays)

    def to_pb(self, job: str, replica: str, every: int = 1) -> pb.MetricSeries:
        """The series as a message; `every` > 1 keeps every so many points only."""
        series = pb.MetricSeries(job=job, replica=replica, limit=self.limit)
        series.steps.extend(self.steps[::every])
        series.times.extend(self.times[::every])
        for name, column in self.columns.items():
            series.columns.add(name=name, values=column[::every])
        return series


def status_values(status: pb.Status) -> dict[str, float]:
    """What a status adds to the history: the script's metrics, lr and steps/s."""
    values = {k: v for k, v in status.metrics.items() if k not in AXES}
    lr = status.values.get("lr")
    if lr is not None and lr.WhichOneof("kind") == "f":
        values["lr"] = lr.f
    values["steps_per_sec"] = status.steps_per_sec
    return values


def limit_from_env() -> int:
    text = os.environ.get("LOOMRUN_HISTORY_POINTS", "")
    if not text:
        return POINTS
    try:
        return min(POINTS, max(16, int(text)))
    except ValueError:
        say(f"LOOMRUN_HISTORY_POINTS={text!r} is not a whole number; keeping {POINTS} points")
        return POINTS


class History:
    """The series of this supervisor's replicas."""

    def __init__(self, job: str, replicas: list[str], limit: int | None = None):
        self.job = job
        self.limit = limit or limit_from_env()
        self.series = {name: Series(self.limit) for name in replicas}
        self._warned: set[str] = set()

    def add(self, replica: str, status: pb.Status) -> None:
        if status.step <= 0:  # before the first step there is nothing to draw
            return
        series = self.series[replica]
        series.add(status.step, status.time, status_values(status))
        if series.left_out and replica not in self._warned:
            self._warned.add(replica)
            say(f"{replica} reports more than {COLUMNS} metrics: the history keeps {COLUMNS}")

    def wire(self, replica: str, max_bytes: int) -> bytes:
        """The replica's series as a message of at most `max_bytes` (thinned if need be)."""
        every = 1
        while True:
            data = self.series[replica].to_pb(self.job, replica, every).SerializeToString()
            if len(data) <= max_bytes or every > POINTS:
                return data
            every *= 2

    def write(self, folders: list[Path], name: str) -> list[str]:
        """Write every series as JSON into each folder, whole or not at all (a file is
        replaced at once); the errors, one line each."""
        body = {
            "job": self.job,
            "limit": self.limit,
            "replicas": {r: series_dict(s.to_pb(self.job, r)) for r, s in self.series.items()},
        }
        return write_whole(folders, name, json.dumps(body, allow_nan=False))
