"""The desired state of one replica, as the supervisor keeps it and writes it to the mailbox.

Level-triggered: each change bumps a version, and the whole state is written every time,
so a worker that missed a write, or restarted, still converges on the latest state.
"""

from __future__ import annotations

from typing import Any

from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb


class DesiredConfig:
    """Parameter values and the paused flag wanted for one replica, with versions."""

    def __init__(self) -> None:
        self.state = pb.DesiredState()

    def set(self, name: str, value: Any, version: int | None = None, at_step: int = 0) -> int:
        """Want `name` = `value`; returns the change's version (the next one unless given)."""
        version = self._next(version)
        entry = self.state.params[name]
        entry.value.CopyFrom(P.to_pb(value))
        entry.version = version
        entry.at_step = at_step
        return version

    def put(self, name: str, want: pb.DesiredParam, version: int) -> None:
        """Take a change as it came off the wire; `version` is its revision in the bucket."""
        entry = self.state.params[name]
        entry.CopyFrom(want)
        entry.version = self._next(version)

    def drop(self, name: str) -> None:
        """Forget a parameter's desired value: the worker keeps what it has."""
        if name in self.state.params:
            del self.state.params[name]

    def pause(self, paused: bool, version: int | None = None, at_step: int = 0) -> int:
        version = self._next(version)
        self.state.paused = paused
        self.state.pause_version = version
        self.state.pause_at_step = at_step
        return version

    def _next(self, version: int | None) -> int:
        version = self.state.version + 1 if version is None else version
        self.state.version = max(self.state.version, version)
        return version
