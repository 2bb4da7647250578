"""The change ledger: every answered change, once, in order, in the broker and on disk.

Each record is the change's Outcome (who asked, replica, parameter, old -> new, the step it
took effect at, applied / rejected / overridden / missed / superseded, its kind: set, hold
or unset, its id and revision). A change answered applied and later written over by the
script's optimizer gets a second record, "overridden" with `ended`, naming the same change
id, the step and the value that replaced it. The
supervisor publishes it on `loomrun.JOB.ledger.NODE_RANK`, kept by the LOOMRUN_LEDGER stream
(file storage; the last LEDGER_KEPT records of each node of each job, for LEDGER_DAYS days;
readers take `loomrun.JOB.ledger.*`, in the broker's order), and appends it as
one JSON line to `changes.jsonl` in the job's directory under the state directory (and
under --log-dir), so the record outlives both the broker and the job. Node K > 0 of a job
of several nodes writes `changes.nodeK.jsonl` beside it: nodes that share a state
directory (two on one machine, or a home directory on NFS) never write one file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from loomrun import params as P
from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.outcomes import kind_word, state_word
from loomrun.output import say


def record(job: str, outcome: pb.Outcome) -> dict[str, Any]:
    """One ledger record as plain data (a line of changes.jsonl, `loomrun log --json`)."""
    return {
        "time": outcome.time,
        "who": outcome.origin,
        "job": job,
        "replica": outcome.replica,
        "name": outcome.name,
        "old": P.from_pb(outcome.old) if outcome.HasField("old") else None,
        "new": P.from_pb(outcome.new) if outcome.HasField("new") else None,
        "step": outcome.step,
        "outcome": state_word(outcome),
        "kind": kind_word(outcome.kind),
        "ended": outcome.ended,
        "reason": outcome.reason or None,
        "change_id": outcome.change_id,
        "revision": outcome.revision,
    }


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
    for path in node_files(folder, "changes", ".jsonl") + node_files(folder, "metrics", ".json"):
        rank = int(found[1]) if (found := _NODE_RANK.search(path.name)) else 0
        if rank != node_rank and not (node_rank == 0 and rank >= nnodes):
            continue
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < started:
                set_aside(path)


def read_files(folder: Path) -> list[dict] | None:
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


class Ledger:
    """The supervisor's writer: the broker through the outbox, the files directly."""

    def __init__(self, job: str, outbox, folders: list[Path], node_rank: int = 0):
        self.subject = S.ledger(job, node_rank)
        self.job = job
        self.outbox = outbox
        self._files = []
        for folder in folders:
            # An earlier run's file was set aside as the supervisor started (set_aside_earlier).
            path = folder / node_file("changes", ".jsonl", node_rank)
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                self._files.append(os.fdopen(fd, "a", buffering=1))
            except OSError as error:
                say(f"cannot keep the change ledger in {folder}: {error.strerror}")

    def record(self, outcome: pb.Outcome) -> None:
        self.outbox.publish(self.subject, outcome)
        line = json.dumps(record(self.job, outcome)) + "\n"
        for f in self._files:
            try:
                f.write(line)  # line-buffered: one write per record, at once
            except OSError as error:
                say(f"cannot write the change ledger: {error.strerror}")

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()
