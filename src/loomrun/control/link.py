"""The supervisor's connection to the broker: connect (starting the bundled broker when
nothing answers on loopback), take a shared bundled broker over when the job that started
it ends, and keep the job's buckets and stream there."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
from collections.abc import Awaitable, Callable

from loomrun import buckets
from loomrun import subjects as S
from loomrun.broker import BrokerError
from loomrun.broker.bundled import BundledBroker, bundled_here, join, leave, user_entry
from loomrun.broker.connect import (
    BrokerOptions,
    answers,
    host_port,
    is_loopback,
    open_connection,
    refused,
)
from loomrun.output import say

SETTLE_SECONDS = 60.0  # how long the broker may refuse the job's state before it goes on without


def nats_replicas() -> int:
    """How many copies JetStream keeps of loomrun's buckets and streams when this supervisor
    makes them: LOOMRUN_NATS_REPLICAS (1 to 5; 3 on a NATS cluster, so that losing a member
    loses nothing), default 1."""
    try:
        return min(5, max(1, int(os.environ.get("LOOMRUN_NATS_REPLICAS", "1"))))
    except ValueError:
        say("LOOMRUN_NATS_REPLICAS is not a whole number; keeping 1 copy")
        return 1


class BrokerLink:
    def __init__(self, options: BrokerOptions, tell=None):
        self.options = options
        # The watchdog's ear: it removes this job's entry among a bundled broker's users
        # if the supervisor dies (the keeper counts only live users, but a broker that
        # never started has no keeper to look).
        self.tell = tell
        self._local_port: int | None = None
        self.nc = None
        self.js = None
        self.kv: dict[str, object] = {}
        self.broker: BundledBroker | None = None
        self.bundled = False  # the broker was seen to be a bundled one (see _bundled)
        self.replicas = 1
        self._starting: threading.Event | None = None  # set once a broker start is over
        self._start_outcome: dict[str, object] = {}  # what that start came to
        self.closing = False
        # Called after every reconnection, once the buckets are there again.
        self.on_reconnect: list[Callable[[], Awaitable[None]]] = []

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self, wait_broker: bool) -> bool:
        """Connect, retrying while it makes sense; False when the job runs without control."""
        while not self.closing:
            try:
                await self._connect()
                break
            except BrokerError as error:
                if "authorization" in str(error).lower():
                    say(f"{refused(self.options.url)}; this job runs without live control")
                    return False
                if not wait_broker and not is_loopback(self.options.url):
                    say(f"{error}; this job runs without live control")
                    return False
                say(f"{error}; trying again")
                await asyncio.sleep(2.0)
        if self.nc is None:
            return False
        return await self.settle(self.ensure_buckets)

    async def settle(self, step: Callable[[], Awaitable[None]]) -> bool:
        """`step` (a setup of the job's state on the broker) until it works: a NATS cluster
        electing its leaders refuses JetStream requests for a while. False, said once,
        when it still fails after SETTLE_SECONDS: the job then runs without control."""
        deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
        said = False
        while not self.closing:
            try:
                await step()
                return True
            except Exception as error:  # noqa: BLE001 - never take the job down
                if asyncio.get_running_loop().time() > deadline:
                    say(f"cannot set up the job's state on the broker ({error}); no live control")
                    return False
                if not said:
                    say(f"the broker cannot take the job's state yet ({error}); trying again")
                    said = True
                await asyncio.sleep(1.0)
        return False

    async def _connect(self) -> None:
        host, port = host_port(self.options.url)
        if is_loopback(self.options.url):
            if self._local_port is None:
                if self.tell is not None:  # first: killed in between, nothing is left
                    self.tell(f"user {user_entry(port)}")
                join(port)  # counted before connecting: its keeper waits for it
                self._local_port = port
            if not answers(host, port):
                await self._start_bundled(port)
        try:
            self.nc = await open_connection(
                self.options,
                connect_timeout=2,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                disconnected_cb=self._disconnected,
                reconnected_cb=self._reconnected,
                error_cb=self._error,
            )
        except Exception as error:  # noqa: BLE001 - one sentence, then the caller decides
            raise BrokerError(
                f"cannot reach the NATS broker at {self.options.url} ({error})"
            ) from None
        self.js = self.nc.jetstream()
        self._bundled()

    async def _start_bundled(self, port: int) -> None:
        """Start the bundled broker in a thread of its own. A stop that comes meanwhile
        (a signal cancels this task, not the thread) waits for it in close(), which then
        stops the broker if this job was its last user: none is left behind."""
        starting = self._starting = threading.Event()
        outcome: dict[str, object] = {}
        self._start_outcome = outcome

        def start() -> None:
            try:
                outcome["broker"] = BundledBroker.start(port, token=self.options.token)
            except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
                outcome["error"] = error
            finally:
                starting.set()

        threading.Thread(target=start, name="loomrun-broker-start", daemon=True).start()
        await asyncio.get_running_loop().run_in_executor(None, starting.wait)
        error = outcome.get("error")
        if isinstance(error, BrokerError) and "already answers" in str(error):
            return  # another job won the race: share it
        if error is not None:
            raise error
        self.broker = outcome["broker"]
        say(f"started the bundled NATS broker on {self.broker.url} (loopback only)")

    async def ensure_buckets(self) -> None:
        """The buckets and the events stream; a broker started afresh may have none."""
        from nats.js import api

        self.replicas = nats_replicas()
        if self.replicas > 1 and not (getattr(self.nc, "_server_info", None) or {}).get("cluster"):
            say(f"LOOMRUN_NATS_REPLICAS={self.replicas}, but {self.options.url} is not a member "
                "of a cluster: keeping 1 copy")  # fmt: skip
            self.replicas = 1
        self.kv[S.DESIRED] = await self._bucket(S.DESIRED)
        self.kv[S.STATE] = await self._bucket(S.STATE)
        self.kv[S.STATUS] = await self._bucket(S.STATUS, storage=api.StorageType.MEMORY, ttl=3600)
        self.kv[S.JOBS] = await self._bucket(S.JOBS, ttl=86400)
        self.kv[S.DEVICES] = await self._bucket(S.DEVICES)
        with contextlib.suppress(Exception):
            await self.js.add_stream(
                name=S.EVENTS_STREAM, subjects=[S.EVENTS_SUBJECTS], max_age=86400,
                max_msgs=100_000, num_replicas=self.replicas,
            )  # fmt: skip
        with contextlib.suppress(Exception):
            await self.ledger_stream()

    async def ledger_stream(self) -> None:
        """The change ledger's stream. One made by an earlier loomrun (on `loomrun.*.ledger`,
        one part a job; or with JetStream's 2-minute duplicate window) takes each node's
        part as well, and the longer window, its records kept."""
        from nats.js import api

        try:
            await self.js.add_stream(
                name=S.LEDGER_STREAM,
                subjects=[S.LEDGER_SUBJECTS],
                max_age=S.LEDGER_DAYS * 86400,
                max_msgs_per_subject=S.LEDGER_KEPT,
                storage=api.StorageType.FILE,
                num_replicas=self.replicas,
                duplicate_window=S.LEDGER_DEDUP_SECONDS,
            )
        except Exception:  # noqa: BLE001 - made already, by another supervisor or an older one
            config = (await self.js.stream_info(S.LEDGER_STREAM)).config
            subjects = config.subjects or []
            window = config.duplicate_window or 0
            if S.LEDGER_SUBJECTS not in subjects or window < S.LEDGER_DEDUP_SECONDS:
                await self.js.update_stream(config.evolve(
                    subjects=[*subjects, *{S.LEDGER_SUBJECTS} - set(subjects)],
                    duplicate_window=max(window, S.LEDGER_DEDUP_SECONDS),
                ))  # fmt: skip

    async def _bucket(self, name: str, **config):
        from nats.js.errors import BucketNotFoundError

        for _ in range(3):
            try:
                return await self.js.key_value(name)
            except BucketNotFoundError:
                pass
            with contextlib.suppress(Exception):  # another supervisor may create it first
                return await self.js.create_key_value(
                    bucket=name, history=1, replicas=self.replicas, **config
                )
        return await self.js.key_value(name)

    async def keys(self, bucket: str, pattern: str) -> list[str]:
        return list(await buckets.snapshot(self.nc, bucket, pattern, keys_only=True))

    async def close(self) -> None:
        """Disconnect, and leave a bundled broker: its keeper stops it once no live process
        uses it (another job still on it keeps it, whoever started it)."""
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 3.0)
        if self._starting is not None and not self._starting.is_set():
            await asyncio.get_running_loop().run_in_executor(None, self._starting.wait, 15.0)
        started = self._start_outcome.get("broker")
        if self.broker is None and isinstance(started, BundledBroker):  # the job ended first
            say(f"started the bundled NATS broker on {started.url} (loopback only)")
        if self._local_port is not None:
            port = self._local_port
            leave(port)

    # -- connection events -------------------------------------------------------------

    async def _disconnected(self) -> None:
        if self.closing:
            return
        say(f"lost the NATS broker at {self.options.url}; training goes on, reconnecting")
        if self._bundled():
            asyncio.ensure_future(self._take_over())

    def _bundled(self) -> bool:
        """The broker at the URL is a bundled one (a job started it), which a job may start
        again; never one the user runs (`loomrun server`, a member of a cluster, whose
        clients reconnect to the other members). Once seen, kept: the job that stops it
        removes its record as it goes, and this job may hear of the loss only after that."""
        if not self.bundled and is_loopback(self.options.url):
            self.bundled = bundled_here(host_port(self.options.url)[1])
        return self.bundled

    async def _take_over(self) -> None:
        """The job that started the shared broker ended: start it again, state intact."""
        await asyncio.sleep(random.uniform(0.1, 0.6))
        host, port = host_port(self.options.url)
        if self.closing or answers(host, port):
            return
        with contextlib.suppress(BrokerError):
            await self._start_bundled(port)

    async def _reconnected(self) -> None:
        say(f"reconnected to the NATS broker at {self.options.url}")
        self._bundled()
        asyncio.ensure_future(self._after_reconnect())

    async def _after_reconnect(self) -> None:
        if not await self.settle(self.ensure_buckets):  # a member may be electing leaders
            return
        for callback in self.on_reconnect:
            await callback()

    async def _error(self, error) -> None:
        return None  # disconnects are reported once by _disconnected, not per retry
