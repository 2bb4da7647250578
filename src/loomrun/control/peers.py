"""The job's other nodes, watched through their heartbeats. A node whose supervisor is
gone (a SIGKILL, a lost machine) sends no word of it, so its peers must see it themselves.

A peer is gone when, for LOST_AFTER_SECONDS together:
- its record, seen beating (or written) while this node watched, has not beaten, and does
  not say that it finished (never judged: a record there from the start that never beats,
  an earlier run's or a node's that died before its first beat here, and a node that died
  before it wrote any);
- this node's own record kept beating on the broker: writes and reads both went through,
  so the silence is the peer's, not the broker's (a failed read of its own record, a
  stalled stream, a lost connection start the count again);
- this node's replicas took no step: ranks that train with a live peer go on stepping (a
  peer only cut off from the broker is not gone), while ranks of a group that lost a node
  wait in a collective, or fail and restart to wait again.

The supervisor is then told as of a node failure that gave up: under the group restart
policy it stops this node (a group cannot form again without the node), and exits 1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb

# This node's own record unchanged for longer than this: the broker is not seen working.
OWN_SILENCE = 2 * S.HEARTBEAT_SECONDS + 1.0


@dataclass
class Beat:
    heartbeat: float  # the node's own clock, as it wrote it: compared for equality only
    changed: float  # this node's monotonic clock when that value was first read
    beating: bool = False  # it changed at least once while watched


class Peers:
    """Owned by the ControlPlane; `watch` runs while it serves. `on_gone` is the
    supervisor's (as for a GroupFailure of another node); `progress` counts this node's
    replicas' steps (any number that moves while they step)."""

    def __init__(self, job: str, node_rank: int, nnodes: int, on_gone: Callable,
                 progress: Callable[[], int]):  # fmt: skip
        self.job, self.node_rank, self.nnodes = job, node_rank, nnodes
        self.on_gone = on_gone
        self.progress = progress
        self.beats: dict[int, Beat] = {}
        self.absent: set[int] = set()  # read, and found with no record yet
        self.gone: set[int] = set()
        self.heard_since: float | None = None  # since when the broker is seen working
        self.steps: tuple[int, float] | None = None  # (count, when it last moved)

    def look(self, records: dict[int, pb.JobInfo | None], now: float, steps: int) -> list[int]:
        """The peers found gone by this look at the records of every node, this one's
        included (None: read, and not there; a node missing was not read); each told once."""
        if self.steps is None or steps != self.steps[0]:
            self.steps = (steps, now)
        readable = records.get(self.node_rank) is not None  # the bucket answers for real
        for rank, info in records.items():
            if info is None:
                if readable:
                    self.absent.add(rank)
                continue
            beat = self.beats.get(rank)
            if beat is None or info.heartbeat != beat.heartbeat:
                written = beat is not None or rank in self.absent  # in this run
                self.beats[rank] = Beat(info.heartbeat, now, beating=written)
        own = self.beats.get(self.node_rank)
        if records.get(self.node_rank) is None or own is None or now - own.changed > OWN_SILENCE:
            self.heard_since = None
            return []
        if self.heard_since is None:
            self.heard_since = now
        found = []
        for rank, info in records.items():
            if info is None or rank == self.node_rank or rank in self.gone:
                continue
            beat = self.beats[rank]
            if not beat.beating or info.finished:
                continue
            quiet = now - max(beat.changed, self.heard_since, self.steps[1])
            if quiet > S.LOST_AFTER_SECONDS:
                self.gone.add(rank)
                found.append(rank)
        return found

    def word(self, rank: int) -> pb.GroupFailure:
        return pb.GroupFailure(
            job=self.job, node_rank=rank, give_up=True, stopped=True, exit_code=1,
            reason=f"its supervisor is gone (no heartbeat for {S.LOST_AFTER_SECONDS:.0f} s)",
            time=time.time(),
        )  # fmt: skip

    async def watch(self, link) -> None:
        """Every heartbeat period: read every node's record, and tell of the gone."""
        while True:
            await asyncio.sleep(S.HEARTBEAT_SECONDS)
            records = await self._read(link) if link.connected else {}
            for rank in self.look(records, time.monotonic(), self.progress()):
                self.on_gone(self.word(rank))

    async def _read(self, link) -> dict[int, pb.JobInfo | None]:
        from nats.js.errors import KeyDeletedError, KeyNotFoundError

        records: dict[int, pb.JobInfo | None] = {}
        for rank in range(self.nnodes):
            try:
                entry = await link.kv[S.JOBS].get(S.job_node(self.job, rank))
                records[rank] = pb.JobInfo.FromString(entry.value or b"")
            except (KeyNotFoundError, KeyDeletedError):
                records[rank] = None
            except DecodeError:
                continue
            except Exception:  # noqa: BLE001 - the broker is away: not read
                continue
        return records
