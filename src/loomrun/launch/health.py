"""Whether a worker still moves: read off its mailbox, never asked of the worker.

A replica that neither steps nor writes a status for long is shown as hung; with
--step-timeout the supervisor stops it and the restart policy decides what follows."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

HANG_AFTER = 60.0
PROGRESS_CHECK = 0.5


def hang_after() -> float:
    """Seconds without a step or a status before a replica shows as hung (at least; ten
    of its usual steps if longer): LOOMRUN_HANG_AFTER, default 60."""
    try:
        return max(0.1, float(os.environ.get("LOOMRUN_HANG_AFTER", HANG_AFTER)))
    except ValueError:
        return HANG_AFTER


@dataclass
class Progress:
    """One worker's progress: the step counter it bumps at each step, and its status,
    which it writes even while paused."""

    since: float = field(default_factory=time.monotonic)
    step: int = 0
    status: int = 0
    step_time: float = 0.0  # seconds per step, smoothed
    hung: bool = False

    def quiet_for(self, step: int, status: int, now: float) -> float:
        """Seconds since the step or the status last moved (or since the start)."""
        if step != self.step:
            if self.step:
                per_step = (now - self.since) / max(1, step - self.step)
                self.step_time = (
                    per_step if not self.step_time else 0.8 * self.step_time + 0.2 * per_step
                )
            self.step, self.status, self.since = step, status, now
            return 0.0
        if status != self.status:
            self.status, self.since = status, now
            return 0.0
        return now - self.since

    def looks_hung(self, quiet: float, timeout: float | None) -> bool:
        """Before its first step a replica may take long (imports, data, rendezvous): only
        --step-timeout, which the user chose, calls that a hang."""
        hung = self.step > 0 and quiet >= max(hang_after(), 10 * self.step_time)
        return hung or (timeout is not None and quiet >= timeout)


async def watch_progress(replicas, mailboxes, timeout: float | None, on_hung, on_timeout) -> None:
    """Until cancelled: each live replica's progress, read off its mailbox twice a second.
    `on_hung(replica, hung, quiet)` hears when it starts or stops looking hung;
    `on_timeout(replica, note)` when --step-timeout ran out (the supervisor stops it)."""
    while True:
        await asyncio.sleep(PROGRESS_CHECK)
        now = time.monotonic()
        for replica in replicas:
            if not replica.alive or replica.failure_note:
                continue
            box, progress = mailboxes[replica.name], replica.progress
            quiet = progress.quiet_for(box.step[0], box.status.seq[0], now)
            hung = progress.looks_hung(quiet, timeout)
            if hung != progress.hung:
                progress.hung = hung
                on_hung(replica, hung, quiet)
            if timeout is not None and quiet >= timeout:
                on_timeout(replica, f"no step for {timeout:g}s (--step-timeout)")
