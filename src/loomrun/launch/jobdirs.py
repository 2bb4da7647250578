"""A job's folders on disk: its records (the change ledger and the metric history, in the
state directory and in --log-dir), the lock that makes its id one supervisor's on this host,
and the run directory of the workers' error files and logs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from loomrun.launch import LaunchSpec
from loomrun.output import say


def record_dirs(spec: LaunchSpec) -> list[Path]:
    """Where the change ledger and the metric history are kept on disk: the job's folder
    in the state directory (`loomrun log` finds them there when the broker no longer
    has them), and --log-dir."""
    from loomrun.broker import BrokerError
    from loomrun.broker.state import private_state_dir
    from loomrun.records import job_dir

    try:
        folders = [job_dir(private_state_dir(), spec.job)]
    except BrokerError as error:
        say(f"{error}; the change ledger is kept in the broker only")
        folders = []
    if spec.log_dir is not None:
        folders.append(Path(spec.log_dir) / spec.job)
    return folders


def claim_job_id(spec: LaunchSpec, folders: list[Path]) -> tuple[int | None, str]:
    """This job id (and node rank) is this supervisor's on this host while it runs: a
    lock in the job's folder of the state directory, held until the process ends (the
    file descriptor returned). Another run of the same id started meanwhile would set its
    records aside and purge its state on the broker: it is refused instead, with the line
    returned."""
    if not folders:
        return None, ""
    import fcntl

    path = folders[0] / f".supervisor.node{spec.node_rank}.lock"
    try:
        folders[0].mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None, ""  # no folder of its own: nothing of an earlier run's there to protect
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        node = f" (node {spec.node_rank})" if spec.nnodes > 1 else ""
        return None, (
            f"job {spec.job}{node} is already running on this host (supervisor pid "
            f"{holder or '?'}): give this one another --job"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd, ""


class RunDir:
    """The workers' error files (and with --log-dir their logs), per attempt and replica:
    --log-dir/JOB, or a temporary folder removed at the end."""

    def __init__(self, spec: LaunchSpec):
        if spec.log_dir is not None:
            self.path = Path(spec.log_dir) / spec.job
            self.path.mkdir(parents=True, exist_ok=True)
            self._own = False
        else:
            self.path = Path(tempfile.mkdtemp(prefix=f"loomrun-{spec.job}-"))
            self._own = True

    def release(self) -> None:
        if self._own:
            shutil.rmtree(self.path, ignore_errors=True)


class JobDirs:
    """A run's folders, owned by the Supervisor: claimed at its start (`claim`), with an
    earlier run's records set aside; the per-attempt folders of its workers; released at
    its end."""

    def __init__(self, spec: LaunchSpec):
        self.spec = spec
        self.records: list[Path] = []
        self.run: RunDir | None = None
        self._lock: int | None = None  # closed with the process: the lock goes with it

    def claim(self, started: float) -> str:
        """The job id made this run's on this host; the line that refuses it otherwise."""
        from loomrun.records import set_aside_earlier

        self.records = record_dirs(self.spec)
        self._lock, refusal = claim_job_id(self.spec, self.records)
        if refusal:
            return refusal
        self.run = RunDir(self.spec)
        for folder in self.records:  # with or without a broker: no earlier run's records
            set_aside_earlier(folder, started, self.spec.node_rank, self.spec.nnodes)
        return ""

    def attempt(self, replica: str, restarts: int) -> Path:
        """The folder of one attempt of one replica: its error file, and logs."""
        folder = self.run.path / f"attempt_{restarts}" / replica
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def replay_plan(self, replica: str, plan: list) -> Path:
        """The replica's replay schedule, as the worker reads it (JSON)."""
        path = self.run.path / f"replay-{replica}.json"
        path.write_text(json.dumps(plan))
        return path

    def release(self) -> None:
        if self.run is not None:
            self.run.release()
