"""What loomrun keeps of a job, as plain data and on disk: the change ledger's records
(`changes.jsonl`, a line each) and the metric history (`metrics.json`), in the job's folder
of the state directory and in --log-dir; node K > 0 of a job writes `changes.nodeK.jsonl`
and `metrics.nodeK.json` beside node 0's. The supervisor writes them (control.ledger,
control.history); `log`, `--replay` and the page read them through here. A file anyone
could have edited: what does not fit is left out."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loomrun._proto import loomrun_pb2 as pb


def record(job: str, outcome: pb.Outcome) -> dict[str, Any]:
    """One ledger record as plain data (a line of changes.jsonl, `loomrun log --json`); a
    change of several parameters is one record, with each one's old and new in "parts"."""
    from loomrun import params as P  # protobuf: not for the job's folders, before the spawns
    from loomrun.outcomes import kind_word, state_word

    out = {
        "time": outcome.time,
        "who": outcome.origin,
        "job": job,
        "replica": outcome.replica,
        "name": outcome.name,
        "old": P.from_field(outcome, "old"),
        "new": P.from_field(outcome, "new"),
        "step": outcome.step,
        "outcome": state_word(outcome),
        "kind": kind_word(outcome.kind),
        "ended": outcome.ended,
        "reason": outcome.reason or None,
        "change_id": outcome.change_id,
        "revision": outcome.revision,
    }
    if outcome.metrics:  # a rule's firing: the values that met its condition
        out["metrics"] = dict(sorted(outcome.metrics.items()))
    if outcome.parts:  # one change of several parameters: "name", "old", "new" are the first's
        out["parts"] = [
            {"name": p.name, "old": P.from_field(p, "old"), "new": P.from_field(p, "new")}
            | ({"overridden": True} if p.overridden else {})
            for p in outcome.parts
        ]
    return out


def job_dir(state: Path, job: str) -> Path:
    return state / "jobs" / job


_NODE_RANK = re.compile(r"\.node([0-9]+)\.")


def node_file(stem: str, suffix: str, node_rank: int) -> str:
    """Node 0's `STEM.SUFFIX`, node K's `STEM.nodeK.SUFFIX`: one file per node of a job."""
    return f"{stem}{suffix}" if node_rank == 0 else f"{stem}.node{node_rank}{suffix}"


def node_files(folder: Path, stem: str, suffix: str) -> list[Path]:
    """Node 0's `STEM.SUFFIX` in a job's folder, then every other node's `STEM.nodeK.SUFFIX`
    (not the earlier runs' ones set aside under a time stamp)."""
    own = re.compile(rf"{re.escape(stem)}\.node[0-9]+{re.escape(suffix)}")
    nodes = [p for p in folder.glob(f"{stem}.node*{suffix}") if own.fullmatch(p.name)]
    return [folder / f"{stem}{suffix}", *sorted(nodes)]


def set_aside_earlier(folder: Path, started: float, node_rank: int = 0, nnodes: int = 1) -> None:
    """A new run of a job id: this node's change ledger and metric history of an earlier run
    (written before this run started) go under another name, so none is read as this run's;
    node 0 does the same for the files of node ranks this run does not have. Never another
    node's of this run: nodes sharing the folder start at their own times."""
    earlier = [
        *node_files(folder, "changes", ".jsonl"), *node_files(folder, "metrics", ".json"),
        *node_files(folder, "schema", ".json"),
    ]  # fmt: skip
    for path in earlier:
        rank = int(found[1]) if (found := _NODE_RANK.search(path.name)) else 0
        if rank != node_rank and not (node_rank == 0 and rank >= nnodes):
            continue
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < started:
                set_aside(path)


def write_whole(folders: list[Path], name: str, text: str) -> list[str]:
    """Write `text` as `name` into each folder, whole or not at all (a file is replaced
    at once); the errors, one line each."""
    errors = []
    for folder in folders:
        path = folder / name
        partial = folder / f".{name}.{os.getpid()}"
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(partial, path)
        except OSError as error:
            errors.append(f"cannot write {path}: {error.strerror}")
            with contextlib.suppress(OSError):
                partial.unlink()
    return errors


def read_schema(folder: Path) -> dict | None:
    """The parameters' document a finished job's nodes left in its folder (`schema.json`,
    and `schema.nodeK.json`), as one; None when none did."""
    found = None
    for path in node_files(folder, "schema", ".json"):
        try:
            document = json.loads(path.read_text())
            properties = document["properties"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue
        if found is None:
            found = document
            continue
        for name, prop in properties.items():  # another node's replicas
            mine = found["properties"].setdefault(name, prop)
            if mine is not prop and isinstance(mine.get("x-loomrun"), dict):
                theirs = prop.get("x-loomrun", {})
                mine["x-loomrun"]["replicas"] += theirs.get("replicas", [])
    return found


def read_changes(folder: Path) -> list[dict] | None:
    """Every node's records of a job's last run in its folder, oldest first; None when no
    node left one."""
    paths = [p for p in node_files(folder, "changes", ".jsonl") if p.is_file()]
    if not paths:
        return None
    records = []
    for path in paths:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, RecursionError):
                    item = json.loads(line)
                    if isinstance(item, dict):
                        records.append(item)
    return sorted(records, key=_when)


def _when(item: dict) -> float:
    return item["time"] if isinstance(item.get("time"), int | float) else 0.0


def set_aside(path: Path) -> None:
    """An earlier run's file under the same job id is kept, under another name
    (`changes.jsonl` -> `changes-20261123-181500.jsonl`)."""
    if path.exists() and path.stat().st_size:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        path.rename(path.with_name(f"{path.stem}-{stamp}{path.suffix}"))


REPORTED_NAN = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_0000_0001))[0]


AXES = ("replica", "step", "time")  # what a point is keyed by: not metric names


def _bits(value: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", value))[0]


_REPORTED_NAN_BITS = _bits(REPORTED_NAN)


def plain(value: float) -> float | str | None:
    """A stored value for JSON: as params.json_float(), or None where it is missing."""
    if math.isfinite(value):  # nearly every value: nothing to look up
        return value
    if math.isnan(value) and _bits(value) != _REPORTED_NAN_BITS:
        return None
    from loomrun.params import json_float  # protobuf: not for the job's folders

    return json_float(value)


def series_dict(series: pb.MetricSeries) -> dict[str, list]:
    """A series as plain columns, fit for JSON (see plain())."""
    out: dict[str, list] = {"step": list(series.steps), "time": list(series.times)}
    for column in series.columns:
        out[column.name] = [plain(v) for v in column.values]
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def points(replica: str, columns: dict[str, list]) -> list[dict[str, Any]]:
    """Columns as one record per point: {"replica", "step", "time", metric: value, ...}.
    Columns can come from a file anyone could have edited: what does not fit is left out."""
    names = [n for n, c in columns.items() if n not in AXES and isinstance(c, list)]
    steps, times = columns.get("step"), columns.get("time")
    if not isinstance(steps, list) or not isinstance(times, list) or len(times) < len(steps):
        return []
    out = []
    for i, step in enumerate(steps):
        if not isinstance(step, int) or isinstance(step, bool) or not _number(times[i]):
            continue
        point = {"replica": replica, "step": step, "time": times[i]}
        for name in names:
            value = columns[name][i] if i < len(columns[name]) else None
            if _number(value) or value in ("nan", "inf", "-inf"):
                point[name] = value
        out.append(point)
    return out


def metrics_file(node_rank: int) -> str:
    """The name of a node's metric history in the job's folder."""
    return node_file("metrics", ".json", node_rank)


def read_metrics(folder: Path) -> dict[str, dict[str, list]]:
    """The series a finished job's nodes wrote into its folder: replica -> columns."""
    found: dict[str, dict[str, list]] = {}
    for path in node_files(folder, "metrics", ".json"):
        try:
            written = json.loads(path.read_text())
            replicas = written["replicas"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue
        if isinstance(replicas, dict):
            found.update(
                {r: c for r, c in replicas.items() if isinstance(r, str) and isinstance(c, dict)}
            )
    return found
