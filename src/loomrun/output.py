"""Worker output: each line once, whole, with its replica's name in front, and to log files."""

from __future__ import annotations

import asyncio
import os
import sys
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


def say(message: str) -> None:
    """The supervisor's own voice on stderr: one line, prefixed so it is told apart."""
    try:
        sys.stderr.write(f"loomrun: {printable(message)}\n")
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass


def prefix_for(name: str, index: int, color: bool) -> bytes:
    if color:
        return f"\x1b[{_COLORS[index % len(_COLORS)]}m[{name}]\x1b[0m ".encode()
    return f"[{name}] ".encode()


class ConsoleStream:
    """One of the supervisor's own streams (stdout or stderr), shared by every replica.

    Each call to `write_lines` is one write of whole lines, so lines from different
    replicas never interleave mid-line. A closed pipe (`loomrun ... | head`) silences
    the console but never the job.
    """

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._closed = False

    def write_lines(self, data: bytes) -> None:
        if self._closed or not data:
            return
        try:
            self._stream.write(data)
            self._stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            self._closed = True


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
                self._emit(pending[:cut], stream)
                pending = pending[cut:]
            elif len(pending) >= _CHUNK:  # a very long line: pass it on in pieces
                self._emit(pending + b"\n", stream)
                pending = b""
        if pending:
            self._emit(pending + b"\n", stream)

    def _emit(self, lines: bytes, stream: str) -> None:
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
            self.consoles[stream].write_lines(prefixed)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()
