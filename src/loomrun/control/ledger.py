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

Each answer is one record, keyed by (replica, change id, outcome). A change gets one
answer, and one more only to end it (`overridden`, ended): a restarted worker answers
again for the change it starts from, and for the replay's changes before its step, and
those are not records (nor is a restarted worker's end of a change ended before). In the
broker each record carries its key, with the job and the run, as its message id (see
Outbox.record): sent again after the broker went away, it is still one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.output import say
from loomrun.records import node_file, record


class Ledger:
    """The supervisor's writer: the broker through the outbox, the files directly."""

    def __init__(self, job: str, outbox, folders: list[Path], node_rank: int = 0, run: float = 0):
        self.subject = S.ledger(job, node_rank)
        self.job = job
        self.outbox = outbox
        self._run = f"{job}:{run:.6f}"  # a new run of the job id answers with new ids
        # (replica, change id) -> the keys whose ending was recorded; the oldest forgotten
        # past LEDGER_KEPT (the stream keeps no more of a node's records either).
        self._recorded: dict[tuple[str, str], set[str]] = {}
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
        if not self._first(outcome):
            return  # answered before: a restarted worker's answer again
        # The change's end, per key (each key of a change of several ends on its own).
        ending = f":ended:{outcome.name}" if outcome.ended else ""
        msg_id = f"{self._run}:{outcome.replica}:{outcome.change_id}:{outcome.state}{ending}"
        self.outbox.record(self.subject, outcome, msg_id)
        line = json.dumps(record(self.job, outcome)) + "\n"
        for f in self._files:
            try:
                f.write(line)  # line-buffered: one write per record, at once
            except OSError as error:
                say(f"cannot write the change ledger: {error.strerror}")

    def _first(self, outcome: pb.Outcome) -> bool:
        """The change's first answer, or the first that ends it."""
        key = (outcome.replica, outcome.change_id)
        ended = outcome.state == pb.OVERRIDDEN and outcome.ended
        endings = self._recorded.get(key)
        if endings is not None and (not ended or outcome.name in endings):
            return False
        endings = self._recorded.pop(key, None) or set()
        if ended:
            endings.add(outcome.name)
        self._recorded[key] = endings  # the newest last: the oldest is forgotten first
        if len(self._recorded) > S.LEDGER_KEPT:
            del self._recorded[next(iter(self._recorded))]
        return True

    @property
    def on_disk(self) -> bool:
        return bool(self._files)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()
