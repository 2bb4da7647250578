"""Reads and writes of loomrun's key-value buckets as plain JetStream API requests.

A command (`set`, `get`, `ls`) does three or four of these and nothing else of
JetStream; doing them through nats-py's `nats.js` would import it, a sixth of the
command's whole time (see `broker.import_nats`). The wire format is JetStream's own
(a bucket B is the stream KV_B, its key K the subject $KV.B.K), so these read and
write the very buckets that nats-py's KeyValue does in the supervisor and `watch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

API = "$JS.API"
DELETED = ("DEL", "PURGE")


class BucketError(Exception):
    """The broker refused or did not answer a bucket request; the message says which."""


class BucketMissing(BucketError):
    """The bucket does not exist on this broker: no loomrun job ever ran there."""


def stream(bucket: str) -> str:
    return f"KV_{bucket}"


def subject(bucket: str, key: str) -> str:
    return f"$KV.{bucket}.{key}"


def pending(reply: str) -> int:
    """How many messages a consumer has left after this one, from its delivery's reply
    subject: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or
    the newer form with <domain>.<account hash> after ACK and a token at the end."""
    tokens = reply.split(".")
    if tokens[:2] != ["$JS", "ACK"] or len(tokens) not in (9, 11, 12):
        raise BucketError(f"a delivery came with {reply!r}, not a JetStream reply subject")
    return int(tokens[8] if len(tokens) == 9 else tokens[10])


def answer(data: bytes, what: str) -> dict:
    """The JSON body of a JetStream API answer; its error as a BucketError."""
    try:
        body = json.loads(data)
    except ValueError:
        raise BucketError(f"the broker answered {what} with something not JSON") from None
    error = body.get("error") if isinstance(body, dict) else None
    if error:
        if error.get("err_code") == 10059:  # stream not found
            raise BucketMissing(error.get("description", "stream not found"))
        raise BucketError(f"the broker refused {what}: {error.get('description', error)}")
    if not isinstance(body, dict):
        raise BucketError(f"the broker answered {what} with {body!r}")
    return body


async def ask(nc, subject: str, payload: bytes, what: str, timeout: float, missing: BucketError):
    """One request; no responders (raised as `missing`) and silence as errors."""
    from nats.errors import NoRespondersError

    try:
        return await nc.request(subject, payload, timeout=timeout)
    except NoRespondersError:
        raise missing from None
    except (TimeoutError, asyncio.TimeoutError):
        raise BucketError(f"the broker did not answer {what} within {timeout:g} s") from None


async def put(nc, bucket: str, key: str, value: bytes, timeout: float = 5.0) -> int:
    """Write one key; its revision (the stream sequence the broker gave it)."""
    what = f"the write of {key}"
    missing = BucketMissing(f"no bucket {bucket}")
    msg = await ask(nc, subject(bucket, key), value, what, timeout, missing)
    return int(answer(msg.data, what).get("seq", 0))


async def snapshot(
    nc, bucket: str, pattern: str, keys_only: bool = False, timeout: float = 5.0
) -> dict[str, bytes]:
    """The current value of every key matching `pattern` (b"" with `keys_only`), deleted
    keys left out.

    Read with a consumer of the last message per key, up to the last one the server
    counted as pending when it made the consumer; not with a KV watch, whose "initial
    values done" marker counts what the client has processed and can come before values
    the server had already sent (and then a snapshot comes back empty)."""
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox)
    config = {
        "deliver_subject": inbox,
        "deliver_policy": "last_per_subject",
        "filter_subject": subject(bucket, pattern),
        "ack_policy": "none",
        "headers_only": keys_only,
        "mem_storage": True,
        "num_replicas": 1,
        "inactive_threshold": 30 * 10**9,  # gone by itself if this process dies mid-read
    }
    request = json.dumps({"stream_name": stream(bucket), "config": config}).encode()
    found: dict[str, bytes] = {}
    name = None
    try:
        what, create = f"a read of {bucket}", f"{API}.CONSUMER.CREATE.{stream(bucket)}"
        no_jetstream = BucketError("the broker has no JetStream (loomrun needs it)")
        msg = await ask(nc, create, request, what, timeout, no_jetstream)
        info = answer(msg.data, what)
        name = info.get("name")
        if info.get("num_pending", 0) + info.get("delivered", {}).get("consumer_seq", 0) == 0:
            return found
        deadline = time.monotonic() + timeout
        prefix = len(subject(bucket, ""))
        while True:
            left = deadline - time.monotonic()
            try:
                msg = await subscription.next_msg(timeout=max(left, 0.001))
            except (TimeoutError, asyncio.TimeoutError):
                raise BucketError(f"{what} stopped short after {timeout:g} s") from None
            key = msg.subject[prefix:]
            if (msg.headers or {}).get("KV-Operation") in DELETED:
                found.pop(key, None)
            else:
                found[key] = b"" if keys_only else msg.data
            if pending(msg.reply or "") == 0:
                return found
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
        if name:
            with contextlib.suppress(Exception):
                await nc.publish(f"{API}.CONSUMER.DELETE.{stream(bucket)}.{name}", b"")
