"""What the supervisor sends to the broker, kept while the broker is away.

Latest-state keys (status, schema, the latest outcome, job and device records) are
coalesced per key: only the newest matters. Messages (each outcome once, events) are kept
in order and sent in order. Records (the change ledger's) are kept until the stream acked
each one: a plain publish that the broker dies holding is gone. So each record carries a
message id, and is sent again until acked; JetStream keeps one copy of an id however often
it came (within the stream's duplicate window; readers skip a later copy too). Records are
sent one at a time, in order, by a loop of their own: waiting for an ack never holds up
the messages and the latest state, and a record sent again cannot land after a later one.
Sending runs in tasks of its own, so a slow or absent broker never holds up the mailboxes,
let alone a training step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque

from loomrun import subjects as S
from loomrun.output import say

MAX_MESSAGES = 10_000
MAX_RECORDS = S.LEDGER_KEPT  # the stream keeps no more of a node's records than this
ACK_TIMEOUT = 5.0
RECORD_TRIES = 3  # tries of one record before its failure is said (once)
_GONE = object()


@functools.cache
def refusals() -> tuple[type[Exception], ...]:
    """What the client or the broker refuses in one message, never for the connection:
    sent again it fails again, so it is left out, and what queues behind it goes on."""
    from nats.errors import BadSubjectError, MaxPayloadError
    from nats.js.errors import BadRequestError, InvalidKeyError

    return (BadSubjectError, MaxPayloadError, BadRequestError, InvalidKeyError)


class Outbox:
    def __init__(self, link):
        self.link = link
        self._latest: dict[tuple[str, str], bytes | None] = {}
        self._messages: deque[tuple[str, bytes]] = deque(maxlen=MAX_MESSAGES)
        self._records: deque[tuple[str, bytes, str]] | None = deque()  # None: no broker
        self.dropped = 0  # records the broker's copy lost to a long absence
        self._said_dropped = False  # said once per absence
        self._failures = 0  # tries in a row that the head record failed
        self._wake = asyncio.Event()
        self._wake_records = asyncio.Event()

    def put(self, bucket: str, key: str, message) -> None:
        """Make `message` the value of `key` (coalesced: a newer one replaces it unsent)."""
        self._latest[(bucket, key)] = message.SerializeToString()
        self._wake.set()

    def delete(self, bucket: str, key: str) -> None:
        self._latest[(bucket, key)] = None
        self._wake.set()

    def publish(self, subject: str, message) -> None:
        """Send `message` once, in order with the others."""
        self._messages.append((subject, message.SerializeToString()))
        self._wake.set()

    def record(self, subject: str, message, msg_id: str) -> None:
        """Send `message` to a stream until it is acked, as one record whatever the retries."""
        if self._records is None:
            return
        if len(self._records) >= MAX_RECORDS:
            self._records.popleft()
            self.dropped += 1
            if not self._said_dropped:
                self._said_dropped = True
                say(f"the broker has not taken {MAX_RECORDS} ledger records: the oldest "
                    "waiting are left out of its copy (changes.jsonl keeps them)")  # fmt: skip
        self._records.append((subject, message.SerializeToString(), msg_id))
        self._wake_records.set()

    def no_broker(self) -> None:
        """The job runs without live control: records are not kept for a broker."""
        self._records = None

    @property
    def unacked(self) -> int:
        """Records the broker has not acked yet."""
        return len(self._records or ())

    async def run(self) -> None:
        """Send messages and the latest state as they come (records: run_records)."""
        await self._loop(self._wake, self.flush)

    async def run_records(self) -> None:
        await self._loop(self._wake_records, self.flush_records)

    @staticmethod
    async def _loop(wake: asyncio.Event, flush) -> None:
        while True:
            await wake.wait()
            wake.clear()
            try:
                await flush()
            except Exception:  # noqa: BLE001 - disconnected: kept, sent after reconnecting
                await asyncio.sleep(0.5)
                wake.set()

    def wake(self) -> None:
        self._wake.set()
        self._wake_records.set()

    async def flush(self) -> None:
        """Messages first (a `set` waits on the outcomes among them), then the latest state:
        the job's record, then schemas and outcomes, then the rest; status goes out without
        waiting for an ack: it matters only as the latest."""
        nc = self.link.nc
        while self._latest or self._messages:
            if nc is None or not nc.is_connected:
                raise ConnectionError("not connected")
            while self._messages:
                subject, data = self._messages[0]
                try:
                    await nc.publish(subject, data)
                except refusals() as error:
                    say(f"left out a message on {subject} that the broker refuses ({error})")
                self._messages.popleft()
            if not self._latest:
                break
            bucket, key = next(  # the job's record first: a client finds the job by it
                (k for b in (S.JOBS, S.STATE) for k in self._latest if k[0] == b),
                next(iter(self._latest)),
            )
            data = self._latest[(bucket, key)]
            kv = self.link.kv[bucket]
            try:
                if data is None:
                    with contextlib.suppress(Exception):
                        await kv.delete(key)
                elif bucket == S.STATUS:
                    await nc.publish(S.kv_subject(S.STATUS, key), data)
                else:
                    await kv.put(key, data)
            except refusals() as error:
                say(f"left out {key} in {bucket}, which the broker refuses ({error})")
            if self._latest.get((bucket, key), _GONE) is data:
                del self._latest[(bucket, key)]

    async def flush_records(self) -> None:
        """Each record until acked, in order (one round trip each). One not acked is sent
        again under its id: the stream keeps the one copy it may have stored before the
        broker went away. A head the broker keeps refusing is said once, and waits."""
        while self._records:
            nc = self.link.nc
            if nc is None or not nc.is_connected:
                raise ConnectionError("not connected")
            head = self._records[0]
            subject, data, msg_id = head
            try:
                await self.link.js.publish(
                    subject, data, timeout=ACK_TIMEOUT, headers={S.MSG_ID: msg_id}
                )
            except refusals() as error:
                say(f"left out a ledger record that the broker refuses ({error})")
            except Exception as error:
                self._failures += 1
                if self._failures == RECORD_TRIES:
                    why = str(error) or type(error).__name__
                    say(f"the broker does not take the change ledger's records ({why}); "
                        "they wait (changes.jsonl keeps them)")  # fmt: skip
                from nats.js.errors import NoStreamResponseError

                if isinstance(error, NoStreamResponseError):
                    await self.link.ledger_stream()  # gone with a broker's store: made again
                raise
            self._failures = 0
            if self._records and self._records[0] is head:  # not dropped meanwhile
                self._records.popleft()
        self._said_dropped = False
