"""The change ledger: every answered change, once, in order, in the broker and on disk.

Each record is the change's Outcome (who asked, replica, parameter, old -> new, the step it
took effect at, applied / rejected / missed / superseded, its id and revision). The
supervisor publishes it on `loomrun.JOB.ledger`, kept by the LOOMRUN_LEDGER stream (file
storage; the last LEDGER_KEPT records of each job, for LEDGER_DAYS days), and appends it as
one JSON line to `changes.jsonl` in the job's directory under the state directory (and
under --log-dir), so the record outlives both the broker and the job.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from loomrun import params as P
from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.output import say

STATES = {pb.APPLIED: "applied", pb.REJECTED: "rejected", pb.MISSED: "missed",
          pb.SUPERSEDED: "superseded"}  # fmt: skip


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
        "outcome": STATES.get(outcome.state, "rejected"),
        "reason": outcome.reason or None,
        "change_id": outcome.change_id,
        "revision": outcome.revision,
    }


def job_dir(state: Path, job: str) -> Path:
    return state / "jobs" / job


def set_aside(path: Path) -> None:
    """An earlier run's file under the same job id is kept, under another name
    (`changes.jsonl` -> `changes-20261123-181500.jsonl`)."""
    if path.exists() and path.stat().st_size:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        path.rename(path.with_name(f"{path.stem}-{stamp}{path.suffix}"))


class Ledger:
    """The supervisor's writer: the broker through the outbox, the files directly."""

    def __init__(self, job: str, outbox, folders: list[Path]):
        self.job = job
        self.outbox = outbox
        self._files = []
        for folder in folders:
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                set_aside(folder / "changes.jsonl")
                fd = os.open(folder / "changes.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                             0o600)  # fmt: skip
                self._files.append(os.fdopen(fd, "a", buffering=1))
            except OSError as error:
                say(f"cannot keep the change ledger in {folder}: {error.strerror}")

    def record(self, outcome: pb.Outcome) -> None:
        self.outbox.publish(S.ledger(self.job), outcome)
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
