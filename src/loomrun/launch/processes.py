"""The process layer of the supervisor (torch elastic's PContext): one worker slot per
replica, and spawning, signalling and reaping its process with everything it started.

Each worker runs in a session of its own, so that a signal reaches its whole process group
(dataloader workers, a shell, helpers). The watchdog is told of each group, so that a
supervisor killed with SIGKILL still takes them along. The restart policy (supervisor.py)
decides *what* to start and stop; this module only does it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loomrun.launch.health import Progress
from loomrun.output import ConsoleStream, ReplicaOutput, prefix_for, say, use_color


@dataclass
class Replica:
    """One worker slot: its identity stays, its process changes across restarts."""

    name: str
    local_rank: int
    restarts: int = 0
    proc: asyncio.subprocess.Process | None = None
    pgid: int | None = None
    started: float = 0.0
    output: ReplicaOutput | None = None
    pumps: list[asyncio.Task] = field(default_factory=list)
    error_file: Path | None = None
    finished: bool = False
    failure_note: str = ""
    progress: Progress = field(default_factory=lambda: Progress())

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def failure(self, how: str, others: bool) -> list[str]:
        """What the supervisor says of this replica's failure past its restarts: how it
        ended, and the end of its error."""
        runtime = time.monotonic() - self.started
        tail = "; stopping the other replicas" if others else ""
        lines = [
            f"replica {self.name} failed: {how} (pid {self.proc.pid}, after {runtime:.1f}s){tail}"
        ]
        detail = self.error_detail()
        if detail:
            lines.append(f"last lines of {self.name}'s error:")
            lines += [f"  {line}" for line in detail]
        return lines

    def error_detail(self) -> list[str]:
        """The traceback torch's @record left, or else the end of the replica's stderr."""
        try:
            record = json.loads(self.error_file.read_text())
            message = record.get("message", {})
            if isinstance(message, dict):
                text = message.get("extraInfo", {}).get("py_callstack") or message.get("message")
            else:
                text = str(message)
            if text:
                return str(text).rstrip().splitlines()[-20:]
        except (OSError, ValueError, AttributeError, TypeError):
            pass
        return list(self.output.tail)[-20:] if self.output else []


class Workers:
    """Spawns, signals, stops and reaps the replicas' processes, and owns the console
    their output goes to (the supervisor's stdout and stderr, its own lines included).
    Owned by the Supervisor.

    `tell` is the watchdog's ear: it hears of each process group as it starts and ends.
    `shown`: the replicas whose output the console shows (None: all)."""

    def __init__(self, grace: float, tell, shown: frozenset[str] | None = None):
        self.grace = grace
        self.tell = tell
        self.shown = shown
        self._color = use_color(sys.stdout) and use_color(sys.stderr)
        self._out = ConsoleStream(sys.stdout.buffer)
        self._err = ConsoleStream(sys.stderr.buffer)
        self._err.speak_here()

    def close(self) -> None:
        """The console written out (a refusal's one line too, before os._exit)."""
        self._out.close()
        self._err.close()

    async def spawn(
        self, replica: Replica, command: list[str], env: dict[str, str], logs: Path | None
    ) -> None:
        """A new process for the slot, its output pumped to the console (and to `logs`)."""
        replica.output = ReplicaOutput(
            prefix_for(replica.name, replica.local_rank, self._color),
            self.shown is None or replica.name in self.shown,
            self._out,
            self._err,
            logs,
        )
        replica.proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
            limit=1 << 20,
        )
        replica.pgid = replica.proc.pid
        replica.progress = Progress()
        self.tell(f"group {replica.pgid}")
        replica.started = time.monotonic()
        replica.pumps = [
            asyncio.ensure_future(replica.output.pump(replica.proc.stdout, "stdout")),
            asyncio.ensure_future(replica.output.pump(replica.proc.stderr, "stderr")),
        ]

    @staticmethod
    def signal(replica: Replica, sig: int) -> None:
        """`sig` to the replica's whole process group, while it is still ours."""
        if replica.pgid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(replica.pgid, sig)

    async def stop(self, replicas: list[Replica], sig: int) -> None:
        """`sig` to each replica's whole process group, the grace period, then SIGKILL."""
        if not replicas:
            return
        for replica in replicas:
            self.signal(replica, sig)
        waits = [asyncio.ensure_future(r.proc.wait()) for r in replicas]
        _, pending = await asyncio.wait(waits, timeout=self.grace)
        if pending:
            late = [r.name for r in replicas if r.alive]
            say(f"{', '.join(late)} still running after {self.grace:g}s: sending SIGKILL")
            for replica in replicas:
                self.signal(replica, signal.SIGKILL)
            await asyncio.wait(pending)
        for replica in replicas:
            self.reap(replica)

    def terminate(self, replica: Replica) -> None:
        """SIGTERM now, and SIGKILL after the grace period if that very process still runs."""
        self.signal(replica, signal.SIGTERM)
        proc = replica.proc

        async def kill_later() -> None:
            await asyncio.sleep(self.grace)
            if replica.proc is proc and replica.alive:
                self.signal(replica, signal.SIGKILL)

        asyncio.ensure_future(kill_later())

    def reap(self, replica: Replica) -> None:
        """Its worker is gone: what it left in its process group (dataloader workers, a
        shell, a helper) goes too, right away, while the group id is still held by them or
        just freed; then the group is forgotten, so no signal ever reaches a group that is
        no longer ours (ids are reused)."""
        if replica.pgid is None or replica.alive:
            return
        self.signal(replica, signal.SIGKILL)
        self.tell(f"forget {replica.pgid}")
        replica.pgid = None

    @staticmethod
    async def drain(replica: Replica) -> None:
        """Let the log pumps reach EOF, but not wait on a grandchild holding the pipe open."""
        if replica.pumps:
            _, pending = await asyncio.wait(replica.pumps, timeout=1.0)
            for task in pending:
                task.cancel()
            replica.pumps = []
        if replica.output is not None:
            replica.output.close()
