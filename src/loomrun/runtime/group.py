"""Agreement of the ranks of one process group on which changes to apply, and when.

A change delivered to each rank's mailbox can always reach one rank a step later than the
others: timing alone cannot make ranks agree. So ranks agree in band. At agreement points
(the same steps on every rank) each rank contributes digests of the group changes it holds
unanswered to one tiny all_reduce on a gloo group of loomrun's own, made right after the
script's `init_process_group` (so the script's own collectives never see it).

The changes are spread by parameter name over BUCKETS buckets (a change of several
parameters by its first one's, so that it is agreed on whole), one digest of names and
change ids per bucket, and the all_reduce takes the minimum of [digests, -digests]: where a
bucket's minimum and maximum are equal, every rank holds exactly the same changes for
those names, and every rank applies them at this very step; otherwise none does. Buckets
keep one parameter that some rank lacks from holding up the others.

How far apart the points are is a time, not a number of steps: a change waits for the
next point, and a fixed count of steps would make it wait longer the slower they are. The same
all_reduce carries the slowest rank's pace (seconds a step since the last point) and the
all_reduce's cost (the longest any rank spent in the last one, its wait for the others
included: ranks that do not meet every step anyway pay that wait); from them every rank
works out the same next point: about AGREE_SECONDS away, and farther when the all_reduce
would take more than BUDGET of the time, up to MOST_SECONDS (a change should not wait
longer, whatever agreeing costs). All of it in steps, at the pace measured at the last
point: steps that slow down after it stretch the wait alike. LOOMRUN_AGREE_EVERY=N fixes
N steps instead.

A change that reached some ranks and not yet others is on its way (a `set` to a large
group reaches its ranks over tens of milliseconds): the ranks, who all see that in the
same all_reduce result, compare again at the very next step, up to FOLLOW_UPS times in a
row, rather than a whole period later.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sys
import time

AGREE_SECONDS = 0.02  # between agreement points, when the steps are shorter than that
BUDGET = 0.02  # the largest share of the time the agreement's all_reduce should take
MOST_SECONDS = 1.0  # the farthest apart the points may be, whatever agreeing costs
FIRST = 2  # steps from joining to the first point, which measures the first pace
BUCKETS = 64
FOLLOW_UPS = 8  # agreement points one step apart, at most, while a change is landing
# The agreement's all_reduce layout; ranks of one group must share it. The join's own
# all_reduce (`Agreement._alike`: PROTOCOL, step, every and their negations, 6 int64) must
# keep its shape in every version, or ranks of two versions cannot even compare.
PROTOCOL = 3


def bucket(name: str) -> int:
    """The same on every rank (Python's own hash() is salted per process)."""
    return hashlib.blake2b(name.encode(), digest_size=2).digest()[0] % BUCKETS


def bucket_of(name: str, want) -> int:
    """A change's bucket: its first parameter's, so that every parameter of one `set` of
    several is in one bucket, agreed on together or not at all."""
    return bucket(want.together[0] if want.together else name)


def digests(changes) -> list[int]:
    """Per bucket, a 63-bit digest of {name: DesiredParam} in it; 0 for an empty bucket."""
    hashers: dict[int, hashlib.blake2b] = {}
    for name in sorted(changes):
        h = hashers.setdefault(bucket_of(name, changes[name]), hashlib.blake2b(digest_size=8))
        h.update(f"{name}\0{changes[name].change_id}\n".encode())
    out = [0] * BUCKETS
    for index, h in hashers.items():
        out[index] = int.from_bytes(h.digest(), "little") >> 1 or 1
    return out


def agree_every() -> int | None:
    """Steps between agreement points when LOOMRUN_AGREE_EVERY fixes them (the ranks settle
    on one value when they join); None, the default: they follow the time steps take."""
    try:
        return min(max(1, int(os.environ["LOOMRUN_AGREE_EVERY"])), 2**31)
    except (KeyError, ValueError):
        return None


def steps_apart(pace: float, cost: float) -> int:
    """Steps to the next regular point, for steps of `pace` seconds and an all_reduce of
    `cost` seconds: AGREE_SECONDS of steps, or as many as keep the all_reduce within
    BUDGET of the time, but no more than MOST_SECONDS of steps; one at least (steps slower
    than that: every step)."""
    if pace <= 0:
        return FIRST  # nothing measured yet
    seconds = min(MOST_SECONDS, max(AGREE_SECONDS, cost / BUDGET))
    return max(1, math.ceil(seconds / pace - 1e-9))


class Points:
    """The steps where the ranks compare: regular points `every` steps apart, or as far
    apart as `steps_apart` says at each of them; and, while a change is landing (on some
    ranks, not all), the very next step too, FOLLOW_UPS times in a row at most. Every rank
    holds the same, as it follows from the same all_reduce results."""

    def __init__(self, every: int | None, step: int = 0):
        self.every = every
        self._next = step + (every or FIRST)  # the next regular point
        self._soon = -1  # the step after a point that left a change landing
        self._follow_ups = FOLLOW_UPS

    def __contains__(self, step: int) -> bool:
        return step == self._next or step == self._soon

    def after(self, step: int) -> int:
        """The first point after `step`."""
        return min(self._next, self._soon) if self._soon > step else self._next

    def compared(self, step: int, landing: bool, pace: float = 0.0, cost: float = 0.0) -> None:
        """The ranks compared at `step`; the slowest one's `pace` and the all_reduce's
        `cost`, both in seconds, place the next regular point."""
        if step == self._next:
            self._next = step + (self.every or steps_apart(pace, cost))
        if landing and self._follow_ups > 0:
            self._soon, self._follow_ups = step + 1, self._follow_ups - 1
            return
        self._soon = -1
        if not landing:
            self._follow_ups = FOLLOW_UPS


class Agreement:
    """The ranks' side channel: a gloo group of the whole world, and the agreement on it."""

    def __init__(self, dist, torch, size: int, rank: int, every: int | None, step: int = 0):
        self._dist, self._torch = dist, torch
        self._group = dist.new_group(backend="gloo")
        self.size, self.rank = size, rank
        self.note = ""  # what the ranks did not hold alike, for the worker to say
        self.every = self._alike(every, step)
        self.points = Points(self.every, step)
        self._last: tuple[float, int] | None = None  # (time, step) at the end of the last one
        self._cost = 0.0  # this rank's last all_reduce, seconds

    def _alike(self, every: int | None, step: int) -> int | None:
        """What places the points must be the same on every rank, or they meet at different
        steps and hang: one all_reduce compares it. Ranks told LOOMRUN_AGREE_EVERY apart
        all take the largest value (none: by time), and say so; another protocol, or ranks
        joining at different steps, leave the group without agreement."""
        mine = [PROTOCOL, step, every or 0]
        both = self._torch.tensor(mine + [-x for x in mine], dtype=self._torch.int64)
        self._dist.all_reduce(both, op=self._dist.ReduceOp.MIN, group=self._group)
        values = both.tolist()
        low, high = values[:3], [-x for x in values[3:]]
        if low[0] != high[0]:
            raise RuntimeError(f"ranks run agreement protocols {low[0]} to {high[0]}")
        if low[1] != high[1]:
            raise RuntimeError(f"ranks joined the group at steps {low[1]} to {high[1]}")
        if low[2] != high[2]:
            self.note = (
                f"the ranks were started with different LOOMRUN_AGREE_EVERY (from "
                f"{low[2] or 'unset'} to {high[2]}); they all agree every {high[2]} steps"
            )
        return high[2] or None

    def agree(self, changes, step: int) -> set[str]:
        """The names of `changes` that every rank holds exactly so (a collective: every
        rank calls it at the same step, one of `points`)."""
        started = time.monotonic()
        pace = 0.0
        if self._last is not None and step > self._last[1]:
            pace = (started - self._last[0]) / (step - self._last[1])
        mine = digests(changes)
        # One MIN for all: digests and negated digests, then the negated pace and cost,
        # whose minimum is the largest of any rank.
        timing = [-round(pace * 1e6), -round(self._cost * 1e6)]
        both = self._torch.tensor(mine + [-d for d in mine] + timing, dtype=self._torch.int64)
        self._dist.all_reduce(both, op=self._dist.ReduceOp.MIN, group=self._group)
        done = time.monotonic()
        self._cost, self._last = done - started, (done, step)
        values = both.tolist()
        agreed = {i for i in range(BUCKETS) if values[i] == -values[BUCKETS + i] == mine[i]}
        landing = any(values[i] != -values[BUCKETS + i] for i in range(BUCKETS))
        slowest, cost = -values[2 * BUCKETS] / 1e6, -values[2 * BUCKETS + 1] / 1e6
        self.points.compared(step, landing, slowest, cost)
        return {name for name, want in changes.items() if bucket_of(name, want) in agreed}

    def alike(self, text: str) -> bool:
        """Whether every rank says the same `text` (a collective, as `agree`: every rank
        calls it at the same step): a rollback checks that all go to one snapshot."""
        digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        mine = [digest >> 1]
        both = self._torch.tensor(mine + [-mine[0]], dtype=self._torch.int64)
        self._dist.all_reduce(both, op=self._dist.ReduceOp.MIN, group=self._group)
        low, high = both.tolist()
        return low == -high == mine[0]


def install(worker) -> None:
    """Wrap torch.distributed's init and destroy so the worker joins and leaves the group."""
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_available():
        return
    init, destroy = c10d.init_process_group, c10d.destroy_process_group

    @functools.wraps(init)
    def init_process_group(*args, **kwargs):
        result = init(*args, **kwargs)
        size = dist.get_world_size()
        if size > 1:
            try:
                agreement = Agreement(
                    dist, torch, size, dist.get_rank(), agree_every(), worker.step
                )
            except Exception as error:  # noqa: BLE001 - never break the script's own setup
                worker.warn_once(
                    f"cannot set up the ranks' agreement ({error}); changes to this job "
                    "apply on each rank as they arrive"
                )
            else:
                if agreement.note and agreement.rank == 0:  # the same on every rank
                    worker.warn_once(agreement.note)
                worker.join_group(agreement)
        return result

    @functools.wraps(destroy)
    def destroy_process_group(*args, **kwargs):
        if not args and kwargs.get("group") is None:
            worker.leave_group()
        return destroy(*args, **kwargs)

    # Modules that bound the names at their own import (device_mesh does) are patched too.
    for module in (c10d, dist, sys.modules.get("torch.distributed.device_mesh")):
        if getattr(module, "init_process_group", None) is init:
            module.init_process_group = init_process_group
        if getattr(module, "destroy_process_group", None) is destroy:
            module.destroy_process_group = destroy_process_group
