"""What a job may leave behind, looked for once it has ended: processes, shared memory,
broker users and locks. Every trial of the stress suite, and each regression test it gave,
runs its jobs with a state directory of its own (XDG_STATE_HOME), which every process of
those jobs inherits: supervisors, watchdogs, brokers and their keepers, workers and what
the workers start. So "a process of that state directory" is exact, whoever its parent."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from loomrun.launch import free_port

SHM = Path("/dev/shm")


def processes_of(state: Path) -> list[tuple[int, str]]:
    """The live processes whose environment has XDG_STATE_HOME=state, as (pid, command)."""
    marker = f"XDG_STATE_HOME={state}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes()
            if marker not in environ.split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[0] != "Z":  # a zombie only waits to be reaped
            found.append((int(entry.name), command.strip()))
    return found


def segments_of(jobs: list[str]) -> list[str]:
    """The shared-memory segments of these jobs (see loomrun.mailbox.new_segment_path)."""
    prefixes = tuple(f"loomrun-{os.getuid()}-{job}-" for job in jobs)
    return sorted(name for name in os.listdir(SHM) if name.startswith(prefixes))


def pid_alive(pid: int) -> bool:
    """A zombie is dead for our purposes: it only waits for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def dead_users(state: Path) -> list[str]:
    """Entries of dead processes among the users of a bundled broker."""
    folder = state / "loomrun"
    return sorted(
        str(entry)
        for users in folder.glob("broker-*.users")
        for entry in users.iterdir()
        if not entry.name.isdigit() or not pid_alive(int(entry.name))
    )


def held_locks(state: Path) -> list[str]:
    """Files of the state directory that some process holds a lock on (a lock file that
    nobody holds is fine), with the holder's pid."""
    inodes = {}
    for path in state.rglob("*"):
        try:
            inodes[path.stat().st_ino] = path
        except OSError:
            continue
    held = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields:  # a process waiting for the lock, not holding it
            continue
        try:
            pid, inode = int(fields[4]), int(fields[5].rsplit(":", 1)[1])
        except (IndexError, ValueError):
            continue
        if inode in inodes:
            held.append(f"{inodes[inode]} (pid {pid})")
    return sorted(held)


def leftovers(state: Path, jobs: list[str]) -> list[str]:
    """Everything these jobs left behind, one line each; empty when nothing is."""
    found = [f"process {pid}: {command}" for pid, command in processes_of(state)]
    found += [f"broker pid record: {path}" for path in (state / "loomrun").glob("broker-*.pid")]
    found += [f"segment /dev/shm/{name}" for name in segments_of(jobs)]
    found += [f"user entry of a dead process: {entry}" for entry in dead_users(state)]
    found += [f"lock held: {lock}" for lock in held_locks(state)]
    return found


def wait_clean(state: Path, jobs: list[str], timeout: float = 10.0) -> float:
    """Seconds until nothing of these jobs is left; an AssertionError naming what is left
    after `timeout`."""
    started = time.monotonic()
    while found := leftovers(state, jobs):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"left behind after {timeout:.0f} s: " + "; ".join(found))
        time.sleep(0.02)
    return time.monotonic() - started


def fresh_state(tmp_path: Path) -> tuple[Path, int, dict]:
    """A state directory of its own, a port no broker answers on, and the environment of
    jobs that use them: (state, port, env). Their supervisors find no broker running."""
    state = tmp_path / "state"
    port = free_port()
    env = {**os.environ, "XDG_STATE_HOME": str(state), "LOOMRUN_NATS": f"nats://127.0.0.1:{port}"}
    return state, port, env


def kill_left(state: Path) -> None:
    """SIGKILL what a failed test left of that state directory: not the next test's."""
    for pid, _ in processes_of(state):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
