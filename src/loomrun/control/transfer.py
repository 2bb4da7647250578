"""The supervisor's part in `loomrun copy` between hosts: a state shared for a replica on
another host goes from its segment into the broker's JetStream object store (on the
source's node, before the share is answered), and from there into a segment on the
target's host (on the target's node, before the copy reaches the mailbox). An engine the
job has already, so no file server is needed. On one host nothing moves here: the target
reads the source's segment. Objects go once fetched, and age out after an hour besides.

A fetch that fails still delivers the copy, with the reason added to its value: the worker
answers it, refused, at its step, as any change is answered. A segment no copy read goes
when its copy is answered otherwise, LEFT_FOR after its share, or when the supervisor
ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from loomrun import params as P
from loomrun import statesegment as seg
from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.output import say

OBJECT_TTL = 3600.0  # seconds an object no target fetched is kept
LEFT_FOR = 600.0  # seconds a segment shared on this host waits for its copy, at most
REMEMBERED = 1000  # change ids of fetches kept, at most


class Transfer:
    def __init__(self, job: str, link, replicas):
        self.job = job
        self.link = link
        self.replicas = replicas  # this node's replicas, by name
        self._store = None
        self._tasks: set[asyncio.Task] = set()
        self._fetched: dict[str, str] = {}  # change id -> "" once fetched, else why not
        self._fetching: set[str] = set()  # change ids of the fetches under way
        self._waiting: set[asyncio.TimerHandle] = set()  # the removals of shared segments

    async def _objects(self):
        if self._store is None:
            from nats.js import api
            from nats.js.errors import BucketNotFoundError

            try:
                self._store = await self.link.js.object_store(S.STATES)
            except BucketNotFoundError:
                config = api.ObjectStoreConfig(
                    description="loomrun: states on their way between hosts (loomrun copy)",
                    ttl=OBJECT_TTL, storage=api.StorageType.FILE, replicas=self.link.replicas,
                )  # fmt: skip
                self._store = await self.link.js.create_object_store(S.STATES, config=config)
        return self._store

    def _start(self, work) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the source's node: a share for another host -------------------------------------

    @staticmethod
    def carries(outcome: pb.Outcome) -> bool:
        """A share done for the object store: its segment goes there before it is answered."""
        if outcome.name != S.SHARE or outcome.state != pb.APPLIED:
            return False
        done = P.from_pb(outcome.new)
        return isinstance(done, dict) and done.get("via") == "store"

    def carry(self, replica: str, outcome: pb.Outcome, answered: Callable) -> None:
        """Put the shared segment in the object store, remove it, then answer: applied with
        the object's name, or refused with the reason."""
        self._start(self._carry(replica, outcome, answered))

    async def _carry(self, replica: str, outcome: pb.Outcome, answered: Callable) -> None:
        done = P.from_pb(outcome.new)
        target, token = str(done.get("target", "")), str(done.get("token", ""))
        path = None
        try:
            path = seg.segment_path(self.job, replica, target, token)
            name = S.state_object(self.job, replica, target, token)
            store = await self._objects()
            with open(path, "rb", opener=_no_links) as data:
                await store.put(name, data, meta=_chunks(name, self.link.nc.max_payload))
            done["object"] = name
            outcome.new.CopyFrom(P.to_pb(done))
        except Exception as error:  # noqa: BLE001 - the share's answer says it
            outcome.state = pb.REJECTED
            outcome.reason = f"the state could not go into the broker's object store: {_why(error)}"
        finally:
            if path is not None:
                path.unlink(missing_ok=True)
        answered(outcome)

    def answered(self, replica: str, outcome: pb.Outcome) -> None:
        """Each answer of this node's replicas: a share's segment on this host waits for its
        copy LEFT_FOR at most; a copy not done removes the segment it was to read."""
        if outcome.name not in (S.SHARE, S.COPY):
            return
        value = P.from_pb(outcome.new)
        if not isinstance(value, dict):
            return
        token = str(value.get("token", ""))
        with contextlib.suppress(seg.SegmentError, OSError):
            if outcome.name == S.SHARE and outcome.state == pb.APPLIED:
                path = seg.segment_path(self.job, replica, str(value.get("target")), token)
                later = asyncio.get_running_loop().call_later(LEFT_FOR, _remove, path)
                self._waiting.add(later)
            elif outcome.name == S.COPY and outcome.state != pb.APPLIED:
                _remove(seg.segment_path(self.job, str(value.get("from")), replica, token))

    # -- the target's node: a copy from another host -------------------------------------

    def needs_fetch(self, replica: str, want: pb.DesiredParam) -> bool:
        """A copy whose state is in the object store and not fetched yet for this change."""
        value = P.from_pb(want.value)
        return (
            isinstance(value, dict)
            and value.get("via") == "store"
            and want.change_id not in self._fetched
        )

    def fetching(self, want: pb.DesiredParam) -> bool:
        """A fetch for this very change is under way (seen again after a reconnect): it
        delivers the change once done."""
        return want.change_id in self._fetching

    def fetch(self, replica: str, want: pb.DesiredParam, then: Callable[[], None]) -> None:
        """Fetch the object into this host's segment for the copy, then `then()`."""
        self._fetching.add(want.change_id)
        self._start(self._fetch(replica, want, then))

    async def _fetch(self, replica: str, want: pb.DesiredParam, then: Callable[[], None]) -> None:
        value = P.from_pb(want.value)
        source, token = str(value.get("from", "")), str(value.get("token", ""))
        problem = ""
        try:
            path = seg.segment_path(self.job, source, replica, token)
            name = S.state_object(self.job, source, replica, token)
            store = await self._objects()
            info = await store.get_info(name)
            if not info.size or info.size > seg.free_bytes():
                raise OSError(
                    f"it takes {info.size} bytes, and /dev/shm here has {seg.free_bytes()} free"
                )
            view = seg.create(path, info.size)
            try:
                await store.get(name, writeinto=view)
                seg.own(view)  # this host's supervisor, for the sweep
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            finally:
                view.close()
            with contextlib.suppress(Exception):
                await store.delete(name)
        except Exception as error:  # noqa: BLE001 - the copy's answer says it
            problem = (
                f"its state could not be fetched from the broker's object store: {_why(error)}"
            )
            say(f"{replica}: {problem}")
        if len(self._fetched) >= REMEMBERED:
            self._fetched.pop(next(iter(self._fetched)))
        self._fetched[want.change_id] = problem
        self._fetching.discard(want.change_id)
        then()

    def dropped(self, replica: str, want: pb.DesiredParam) -> None:
        """A copy fetched, and replaced by a later one before it was delivered."""
        value = P.from_pb(want.value)
        with contextlib.suppress(seg.SegmentError):
            path = seg.segment_path(
                self.job, str(value.get("from")), replica, str(value.get("token"))
            )
            path.unlink(missing_ok=True)

    def annotated(self, want: pb.DesiredParam) -> pb.DesiredParam:
        """The copy as the worker gets it: with the reason its fetch failed, if it did."""
        problem = self._fetched.get(want.change_id, "")
        if problem:
            value = P.from_pb(want.value)
            value["problem"] = problem
            want.value.CopyFrom(P.to_pb(value))
        return want

    # -- the end ---------------------------------------------------------------------------

    async def close(self) -> None:
        """The transfers under way finish (a share done is answered), for 10 s at most."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10.0)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for later in self._waiting:
            later.cancel()
        self.remove_left()

    def remove_left(self) -> None:
        """The segments this node's replicas shared or were to copy, never read."""
        for path in seg.segments_of(self.job, self.replicas):
            path.unlink(missing_ok=True)


def _chunks(name: str, max_payload: int):
    """Chunks as large as the server takes (each one is a publish and its ack: nats-py's
    128 KiB makes a 100 MB state 800 round trips)."""
    from nats.js import api

    size = max(128 << 10, min(max_payload - (4 << 10), 8 << 20))
    return api.ObjectMeta(name=name, options=api.ObjectMetaOptions(max_chunk_size=size))


def _remove(path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _no_links(path, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def _why(error: Exception) -> str:
    said = str(error).strip()
    return f"{type(error).__name__}: {said}" if said else type(error).__name__
