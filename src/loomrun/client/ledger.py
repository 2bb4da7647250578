"""The change ledger off the broker: a stream, read in order from its first record."""

from __future__ import annotations

import contextlib

from google.protobuf.message import DecodeError

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.broker.connect import several_filters


async def ledger(nc, js, job: str, follow: bool = False):
    """The job's change ledger from the broker, oldest first; with `follow`, then each new
    record as it comes. Yields Outcome records (the job is in their subject)."""
    from nats.js import api

    subjects = [S.ledger(job, "*")]
    with contextlib.suppress(Exception):  # a stream an earlier loomrun made: its records
        stream = await js.stream_info(S.LEDGER_STREAM)
        if several_filters(nc) and S.LEDGER_BEFORE in stream.config.subjects:
            subjects.append(S.ledger_before(job))
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.ALL,
        filter_subjects=subjects if len(subjects) > 1 else None,
        filter_subject=None if len(subjects) > 1 else subjects[0],
    )
    try:
        subscription = await js.subscribe(
            subjects[0], stream=S.LEDGER_STREAM, ordered_consumer=True, config=config
        )
    except Exception:  # noqa: BLE001 - no ledger stream on this broker yet
        return
    try:
        info = await subscription.consumer_info()
        # Nothing left, nor delivered yet: none at all. Its delivery count, not the
        # stream sequence it delivered up to, which a purge moves past 0.
        if info.num_pending == 0 and not info.delivered.consumer_seq and not follow:
            return
        seen: set[str | None] = set()  # a copy the broker took after its duplicate window
        async for msg in subscription.messages:
            msg_id = (msg.headers or {}).get(S.MSG_ID)  # none on an older loomrun's records
            if msg_id is None or msg_id not in seen:
                seen.add(msg_id)
                with contextlib.suppress(DecodeError):
                    yield pb.Outcome.FromString(msg.data)
            if not follow and msg.metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
