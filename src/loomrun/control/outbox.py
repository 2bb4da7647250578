"""What the supervisor sends to the broker, kept while the broker is away.

Latest-state keys (status, schema, the latest outcome, job and device records) are
coalesced per key: only the newest matters. Messages (each outcome once, events) are kept
in order and sent in order. Sending runs in its own task, so a slow or absent broker never
holds up the mailboxes, let alone a training step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque

from loomrun import subjects as S
from loomrun.output import say

MAX_MESSAGES = 10_000
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
        self._wake = asyncio.Event()

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

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - disconnected: kept, sent after reconnecting
                await asyncio.sleep(0.5)
                self._wake.set()

    def wake(self) -> None:
        self._wake.set()

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
