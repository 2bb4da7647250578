"""Metric history: each replica's reported metrics, lr and steps/s, as a bounded series.

A curve of a run of days needs the run's whole shape, not its last minutes. A series keeps
at most POINTS points. When full, every other point goes, and from then on a point is
taken only once the step has moved on by the spacing of the points kept, so the points
stay evenly spread over the steps of the whole run. Points come from the statuses the
pump reads (about four a second per replica), one per step at most.

Memory per replica: 8 bytes per point for the step, 8 for the time and 8 per column, at
most COLUMNS columns: (2 + columns) x 8 x POINTS bytes, 80 KiB for loss, lr and steps/s
(`benchmarks/history.py` measures it).

A client asks a supervisor for a replica's series on `loomrun.{job}.history.{replica}`;
at job end the supervisor writes its replicas' series next to the change ledger.
"""

from __future__ import annotations

import json
import math
import os
import re
from array import array
from pathlib import Path
from typing import Any

from loomrun._proto import loomrun_pb2 as pb
from loomrun.output import say

POINTS = 2048  # per replica; LOOMRUN_HISTORY_POINTS sets another (at least 16)
COLUMNS = 32  # metric names per replica; more are left out of the history (not of status)
NAN = math.nan
AXES = ("replica", "step", "time")  # what a point is keyed by: not metric names
_NODE_FILE = re.compile(r"metrics\.node[0-9]+\.json")


class Series:
    """One replica's history: steps, times and one column of values per metric."""

    def __init__(self, limit: int = POINTS):
        self.limit = limit
        self.spacing = 1.0  # in steps: a point closer to the last one is not taken
        self.steps = array("q")
        self.times = array("d")
        self.columns: dict[str, array] = {}
        self.left_out: set[str] = set()

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
                    self.left_out.add(name)
                    continue
                column = self.columns[name] = array("d", [NAN]) * count
            column.append(value)
        for column in self.columns.values():
            if len(column) == count:
                column.append(NAN)
        if len(self.steps) > self.limit:
            self._thin()
        return True

    def _thin(self) -> None:
        """Every other point goes (the first and the last stay: the count is odd here)."""
        self.steps = self.steps[::2]
        self.times = self.times[::2]
        for name, column in self.columns.items():
            self.columns[name] = column[::2]
        gap = (self.steps[-1] - self.steps[0]) / (len(self.steps) - 1)
        self.spacing = max(2 * self.spacing, gap)

    def nbytes(self) -> int:
        arrays = [self.steps, self.times, *self.columns.values()]
        return sum(a.itemsize * a.buffer_info()[1] for a in arrays)

    def to_pb(self, job: str, replica: str) -> pb.MetricSeries:
        series = pb.MetricSeries(job=job, replica=replica, limit=self.limit)
        series.steps.extend(self.steps)
        series.times.extend(self.times)
        for name, column in self.columns.items():
            series.columns.add(name=name, values=column)
        return series


def status_values(status: pb.Status) -> dict[str, float]:
    """What a status adds to the history: the script's metrics, lr and steps/s."""
    values = {k: v for k, v in status.metrics.items() if k not in AXES}
    lr = status.values.get("lr")
    if lr is not None and lr.WhichOneof("kind") == "f":
        values["lr"] = lr.f
    values["steps_per_sec"] = status.steps_per_sec
    return values


def series_dict(series: pb.MetricSeries) -> dict[str, list]:
    """A series as plain columns (JSON has no NaN: a missing value is None)."""
    out: dict[str, list] = {"step": list(series.steps), "time": list(series.times)}
    for column in series.columns:
        out[column.name] = [None if math.isnan(v) else v for v in column.values]
    return out


def points(replica: str, columns: dict[str, list]) -> list[dict[str, Any]]:
    """Columns as one record per point: {"replica", "step", "time", metric: value, ...}."""
    names = [n for n, c in columns.items() if n not in AXES and isinstance(c, list)]
    steps, times = columns.get("step"), columns.get("time")
    if not isinstance(steps, list) or not isinstance(times, list) or len(times) < len(steps):
        return []
    out = []
    for i, step in enumerate(steps):
        point = {"replica": replica, "step": step, "time": times[i]}
        for name in names:
            value = columns[name][i] if i < len(columns[name]) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                point[name] = value
        out.append(point)
    return out


def limit_from_env() -> int:
    text = os.environ.get("LOOMRUN_HISTORY_POINTS", "")
    if not text:
        return POINTS
    try:
        return max(16, int(text))
    except ValueError:
        say(f"LOOMRUN_HISTORY_POINTS={text!r} is not a whole number; keeping {POINTS} points")
        return POINTS


def file_name(node_rank: int) -> str:
    return "metrics.json" if node_rank == 0 else f"metrics.node{node_rank}.json"


def read_files(folder: Path) -> dict[str, dict[str, list]]:
    """The series a finished job's nodes wrote into its folder: replica -> columns."""
    found: dict[str, dict[str, list]] = {}
    nodes = [p for p in folder.glob("metrics.node*.json") if _NODE_FILE.fullmatch(p.name)]
    paths = [folder / "metrics.json", *sorted(nodes)]
    for path in paths:
        try:
            written = json.loads(path.read_text())
            replicas = written["replicas"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(replicas, dict):
            found.update(
                {r: c for r, c in replicas.items() if isinstance(r, str) and isinstance(c, dict)}
            )
    return found


class History:
    """The series of this supervisor's replicas."""

    def __init__(self, job: str, replicas: list[str], limit: int | None = None):
        limit = limit or limit_from_env()
        self.job = job
        self.limit = limit
        self.series = {name: Series(limit) for name in replicas}

    def add(self, replica: str, status: pb.Status) -> None:
        if status.step > 0:  # before the first step there is nothing to draw
            self.series[replica].add(status.step, status.time, status_values(status))

    def to_pb(self, replica: str) -> pb.MetricSeries:
        return self.series[replica].to_pb(self.job, replica)

    def write(self, folders: list[Path], name: str) -> list[str]:
        """Write every series as JSON into each folder; the errors, one line each."""
        body = {
            "job": self.job,
            "limit": self.limit,
            "replicas": {r: series_dict(self.to_pb(r)) for r in self.series},
        }
        text = json.dumps(body)
        errors = []
        for folder in folders:
            path = folder / name
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            except OSError as error:
                errors.append(f"cannot write the metric history {path}: {error.strerror}")
        return errors
