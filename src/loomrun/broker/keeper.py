"""The bundled nats-server's keeper: its parent, and the one process sure to stop it.

A bundled broker must never exist without a live process that will stop it. Its starter
cannot be that process: the broker is shared, and outlives the job that started it. So
the starter runs this keeper, which starts nats-server as its own child (the server ends
with it, by the parent-death signal), records the server's pid, and stops it once no live
process is counted among the broker's users (one entry a pid in the users folder), seen
empty at two looks a quarter of a second apart. It also stops it on SIGTERM, SIGINT or
SIGHUP. It then removes the pid record and leaves.

The keeper holds the port's start lock (an flock its starter hands it) for its whole
life: while it lives no other process starts a server on the port, and once it is gone,
however it went, the kernel has released the lock.

`python -I -S keeper.py LOCK_FD USERS PID_RECORD -- SERVER_COMMAND...`: a Python with
neither site nor loomrun, importing nothing outside the interpreter's core (a few ms).
"""

from __future__ import annotations

import os
import signal
import sys
import time

LOOK_EVERY = 0.25  # seconds between two looks at the users folder
EMPTY_LOOKS = 2  # looks in a row that find no live user, before the server is stopped
STOP_GRACE = 2.0  # seconds between SIGTERM and SIGKILL of the server
_PR_SET_PDEATHSIG = 1


def live_users(folder: str) -> list[int]:
    """The pids with an entry in `folder` that are alive; the entries of the dead (and of
    the zombies, dead but not reaped yet) are removed."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    alive = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                state = stat.read().rsplit(b")", 1)[-1].split()[0]
        except (OSError, IndexError):
            state = b"Z"
        if state == b"Z":
            _unless_gone(os.unlink, os.path.join(folder, name))
            continue
        alive.append(int(name))
    return alive


def _unless_gone(call, *args) -> None:
    """`call(*args)`, where an OSError means there is nothing left to act on."""
    try:  # noqa: SIM105 - contextlib would cost the start-up a few ms
        call(*args)
    except OSError:
        pass


def _spawn(command: list[str]) -> int:
    """The server, as a child that gets SIGKILL when the keeper dies, however it dies."""
    keeper = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            import ctypes

            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() == keeper:
                os.execv(command[0], command)
        finally:
            os._exit(127)
    return pid


def _exited(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


def _stop(pid: int) -> None:
    _unless_gone(os.kill, pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while not _exited(pid):
        if time.monotonic() > deadline:
            _unless_gone(os.kill, pid, signal.SIGKILL)
            _unless_gone(os.waitpid, pid, 0)
            return
        time.sleep(0.02)


def main() -> int:
    lock, users, record = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    command = sys.argv[sys.argv.index("--") + 1 :]
    os.set_inheritable(lock, False)  # the keeper's alone: not the server's
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # waited for, whatever the starter ignored
    asked: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda number, _: asked.append(number))
    pid = _spawn(command)
    fd = os.open(record + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, str(pid).encode())
    os.close(fd)
    os.replace(record + ".tmp", record)
    empty = 0
    try:
        while not _exited(pid):
            empty = 0 if live_users(users) else empty + 1
            if asked or empty >= EMPTY_LOOKS:
                _stop(pid)
                break
            time.sleep(LOOK_EVERY)
    finally:
        try:
            with open(record) as written:
                ours = written.read().strip() == str(pid)
        except OSError:
            ours = False
        if ours:
            _unless_gone(os.unlink, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
