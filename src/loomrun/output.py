"""Worker output: each line once, whole, with its replica's name in front, and to log files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sys
import threading
from collections import deque
from pathlib import Path
from typing import BinaryIO

from loomrun.printable import printable

# Bright, readable on dark and light terminals; cycled over replicas.
_COLORS = (36, 33, 35, 32, 34, 31, 96, 93, 95, 92, 94, 91)
_CHUNK = 1 << 16


def use_color(stream) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# The supervisor's stderr console once it has one: its own lines then queue behind the
# workers' lines already read, so a failure summary follows the traceback it sums up.
_stderr: ConsoleStream | None = None


def say(message: str) -> None:
    """The supervisor's own voice on stderr: one line, prefixed so it is told apart."""
    line = f"loomrun: {printable(message)}\n"
    if _stderr is not None:
        _stderr.say(line.encode())  # never a blocking write on the supervisor's event loop
        return
    try:
        sys.stderr.write(line)
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass


def prefix_for(name: str, index: int, color: bool) -> bytes:
    if color:
        return f"\x1b[{_COLORS[index % len(_COLORS)]}m[{name}]\x1b[0m ".encode()
    return f"[{name}] ".encode()


class ConsoleStream:
    """One of the supervisor's own streams (stdout or stderr), shared by every replica.

    Each write is one write of whole lines, so lines from different replicas never
    interleave mid-line. The writes happen on a thread of their own: a console that does
    not keep up (a paused `less`, a full pipe nobody reads) holds back the workers' output,
    as it would for any program, but never the supervisor's event loop, which keeps
    steering, restarts and signals going. A closed pipe (`loomrun ... | head`) silences the
    console but never the job.
    """

    def __init__(self, stream: BinaryIO, backlog: int = 256):
        self._stream = stream
        self._closed = False
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=backlog)
        self._thread = threading.Thread(target=self._drain, name="console", daemon=True)
        self._thread.start()

    def speak_here(self) -> None:
        """Make `say` go through this console (the supervisor's stderr)."""
        global _stderr
        _stderr = self

    def _drain(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._closed:
                continue
            try:
                self._stream.write(data)
                self._stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                self._closed = True

    async def write_lines(self, data: bytes) -> None:
        """Queue whole lines; while the console is behind, wait (the worker's pipe fills
        and holds the worker back) without blocking the loop or parking a thread."""
        while not self._closed and data:
            try:
                self._queue.put_nowait(data)
                return
            except queue.Full:
                await asyncio.sleep(0.01)

    def say(self, line: bytes) -> None:
        """Queue one line of the supervisor's own; dropped if the console is stuck (nobody
        reads it then) rather than stall the supervisor."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(line)

    def close(self, timeout: float = 5.0) -> None:
        """Write out what is queued (for at most `timeout`: a console nobody reads must not
        keep the supervisor from exiting)."""
        global _stderr
        if _stderr is self:
            _stderr = None
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)


class ReplicaOutput:
    """Copies one run of a replica's stdout and stderr to the console and to its log files."""

    def __init__(
        self,
        prefix: bytes,
        show: bool,
        console_out: ConsoleStream,
        console_err: ConsoleStream,
        log_dir: Path | None,
        tail_lines: int = 30,
    ):
        self.prefix = prefix
        self.show = show
        self.consoles = {"stdout": console_out, "stderr": console_err}
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self.files: dict[str, BinaryIO] = {}
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            for stream in ("stdout", "stderr"):
                self.files[stream] = open(log_dir / f"{stream}.log", "ab")  # noqa: SIM115

    async def pump(self, reader: asyncio.StreamReader, stream: str) -> None:
        """Read until EOF; forward complete lines, and a final unterminated one."""
        pending = b""
        while True:
            chunk = await reader.read(_CHUNK)
            if not chunk:
                break
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if cut:
                await self._emit(pending[:cut], stream)
                pending = pending[cut:]
            elif len(pending) >= _CHUNK:  # a very long line: pass it on in pieces
                await self._emit(pending + b"\n", stream)
                pending = b""
        if pending:
            await self._emit(pending + b"\n", stream)

    async def _emit(self, lines: bytes, stream: str) -> None:
        log = self.files.get(stream)
        if log is not None:
            log.write(lines)
            log.flush()
        split = lines.split(b"\n")[:-1]
        if stream == "stderr":
            for line in split[-self.tail.maxlen :]:
                self.tail.append(line.decode("utf-8", "replace"))
        if self.show:
            prefixed = b"".join(self.prefix + line + b"\n" for line in split)
            await self.consoles[stream].write_lines(prefixed)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()
