"""Nothing outlives a job: the watchdog that cleans up after a supervisor however it died.

The supervisor starts this watchdog first, in a session of its own, and keeps the write
end of a pipe to it. The kernel closes that pipe when the supervisor dies, however it
dies, SIGKILL included: the watchdog reads end-of-file at once. As the job goes, the
supervisor tells it, one line each, the process groups of its workers, its shared-memory
segments and its entry among the users of a bundled broker. On end-of-file without a
goodbye (`done`), the watchdog kills those process groups and removes those files; then it
exits. (The broker itself has a keeper, which sees its last user gone: broker/keeper.py.)

Why a watchdog: the workers' parent-death signal (PR_SET_PDEATHSIG) reaches each worker,
but not what the worker started (a helper process, a shell), which would live on with
parent 1; a kill of the worker's whole process group reaches them all, and someone alive
has to send it. pidfds would need the watcher to be alive too, and the supervisor is the
one that died. The watchdog costs one small process per job, asleep on a read.
"""

from __future__ import annotations

import os
import signal
import sys


class Watchdog:
    """The supervisor's end: what to clean up if it dies, told as the job goes.

    Started first (`start`), before the job's lock, its mailboxes, its broker or its
    workers exist: a supervisor killed at any moment of start-up leaves nothing behind.
    It is a Python started with neither site nor loomrun, importing nothing outside the
    interpreter's core (10-20 ms of CPU, beside the supervisor's own start-up, not on the
    workers' path)."""

    def __init__(self) -> None:
        self.process = None

    def start(self) -> None:
        import subprocess  # loaded already by asyncio: free here

        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", __file__, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C or a SIGHUP of the terminal is not for it
        )

    def tell(self, line: str) -> None:
        if self.process is None:
            return  # not started: a Supervisor built but not run
        try:
            self.process.stdin.write(f"{line}\n".encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # it died: nothing to tell, the supervisor cleans up itself

    def close(self) -> None:
        """The supervisor cleaned up itself: the watchdog leaves without acting, by itself
        on reading the goodbye; nothing waits for it (8 ms off the end of every job)."""
        if self.process is None:
            return
        self.tell("done")
        _unless_gone(self.process.stdin.close)


def _unless_gone(call, *args) -> None:
    """`call(*args)`, where an OSError means there is nothing left to act on (contextlib
    would cost the watchdog's start-up a few ms more)."""
    try:  # noqa: SIM105 - see above
        call(*args)
    except OSError:
        pass


def main() -> None:
    """`python -I -S watchdog.py SUPERVISOR_PID`: the pid only shows in `ps` whose it is."""
    groups: set[int] = set()
    files: set[str] = set()  # segments, and the job's entry among a broker's users
    for raw in sys.stdin.buffer:
        command, _, argument = raw.decode(errors="replace").strip().partition(" ")
        if command == "group":
            groups.add(int(argument))
        elif command == "forget":
            groups.discard(int(argument))
        elif command in ("segment", "user"):
            files.add(argument)
        elif command == "unsegment":
            files.discard(argument)
        elif command == "done":
            return
    for pgid in groups:
        _unless_gone(os.killpg, pgid, signal.SIGKILL)
    for path in files:
        _unless_gone(os.unlink, path)


if __name__ == "__main__":
    main()
