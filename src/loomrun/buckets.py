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

from loomrun import subjects as S

API = "$JS.API"
DELETED = ("DEL", "PURGE")


class BucketError(Exception):
    """The broker refused or did not answer a bucket request; the message says which."""


class BucketMissing(BucketError):
    """The bucket does not exist on this broker: no loomrun job ever ran there."""


def stream(bucket: str) -> str:
    return f"KV_{bucket}"


def subject(bucket: str, key: str) -> str:
    return S.kv_subject(bucket, key)


def delivery(reply: str) -> tuple[int, int]:
    """A consumer's delivery, from its reply subject: the message's stream sequence (a key's
    revision) and how many messages the consumer has left after it. The subject is
    $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the newer
    form with <domain>.<account hash> after ACK and a token at the end."""
    tokens = reply.split(".")
    if tokens[:2] != ["$JS", "ACK"] or len(tokens) not in (9, 11, 12):
        raise BucketError(f"a delivery came with {reply!r}, not a JetStream reply subject")
    at = 0 if len(tokens) == 9 else 2
    return int(tokens[5 + at]), int(tokens[8 + at])


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


async def ask(
    nc, subject: str, payload: bytes, what: str, timeout: float, missing: BucketError,
    headers: dict[str, str] | None = None,
):  # fmt: skip
    """One request; no responders (raised as `missing`) and silence as errors."""
    from nats.errors import NoRespondersError

    try:
        return await nc.request(subject, payload, timeout=timeout, headers=headers)
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


async def purge(nc, bucket: str, key: str, timeout: float = 5.0) -> int:
    """Remove a key and its history, as nats-py's KeyValue.purge does; the revision of the
    purge itself (whatever is written after it has a higher one)."""
    what = f"the purge of {key}"
    missing = BucketMissing(f"no bucket {bucket}")
    marker = {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}
    msg = await ask(nc, subject(bucket, key), b"", what, timeout, missing, headers=marker)
    return int(answer(msg.data, what).get("seq", 0))


async def made(nc, bucket: str, timeout: float = 5.0) -> str:
    """When the bucket's stream was made, as the broker says (its own clock). Another answer
    means another stream, whose revisions started again from 1: a broker back with an
    empty store, the bucket made again."""
    what = f"the description of {bucket}"
    missing = BucketMissing(f"no bucket {bucket}")
    msg = await ask(nc, f"{API}.STREAM.INFO.{stream(bucket)}", b"", what, timeout, missing)
    return str(answer(msg.data, what).get("created", ""))


async def snapshot(
    nc, bucket: str, pattern: str, keys_only: bool = False, timeout: float = 5.0
) -> dict[str, bytes]:
    """The current value of every key matching `pattern` (b"" with `keys_only`), deleted
    keys left out (see `entries`)."""
    found = await entries(nc, bucket, pattern, keys_only, timeout)
    return {key: data for key, (_, data) in found.items()}


async def entries(
    nc, bucket: str, pattern: str, keys_only: bool = False, timeout: float = 5.0
) -> dict[str, tuple[int, bytes]]:
    """The revision and current value of every key matching `pattern` (b"" with
    `keys_only`), deleted keys left out.

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
    found: dict[str, tuple[int, bytes]] = {}
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
            revision, left = delivery(msg.reply or "")
            if (msg.headers or {}).get("KV-Operation") in DELETED:
                found.pop(key, None)
            else:
                found[key] = (revision, b"" if keys_only else msg.data)
            if left == 0:
                return found
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
        if name:
            with contextlib.suppress(Exception):
                await nc.publish(f"{API}.CONSUMER.DELETE.{stream(bucket)}.{name}", b"")
