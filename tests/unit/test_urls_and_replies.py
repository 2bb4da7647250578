"""Broker URLs and JetStream replies, read in process: every bad one is one sentence."""

from __future__ import annotations

import pytest

from loomrun.broker import BrokerError
from loomrun.broker.connect import host_port, is_loopback


@pytest.mark.parametrize(
    "url, loopback",
    [("nats://127.0.0.1:4222", True), ("localhost:4222", True), ("nats://10.1.2.3", False)],
)
def test_urls(url, loopback):
    assert is_loopback(url) is loopback


@pytest.mark.parametrize("url", ["http://x:1", "nats://host:99999", "nats://", "nats://[::1"])
def test_bad_urls_are_one_line_errors(url):
    with pytest.raises(BrokerError):
        host_port(url)


@pytest.mark.parametrize(
    "reply, sequence, left",
    [
        ("$JS.ACK.KV_x.c1.1.10.3.1700000000000000000.7", 10, 7),
        ("$JS.ACK.dom.hash.KV_x.c1.1.11.3.1700000000000000000.0.tok", 11, 0),
        ("$JS.ACK.dom.hash.KV_x.c1.1.12.3.1700000000000000000.2", 12, 2),
    ],
)
def test_a_delivery_is_read_from_both_reply_forms(reply, sequence, left):
    from loomrun.buckets import delivery

    assert delivery(reply) == (sequence, left)


@pytest.mark.parametrize(
    "data, error",
    [
        (b"not json", "not JSON"),
        (b"[1]", "answered"),
        (b'{"error": {"code": 500, "err_code": 1, "description": "insufficient resources"}}',
         "refused the write of k: insufficient resources"),
    ],
)  # fmt: skip
def test_bad_answers_are_one_sentence(data, error):
    from loomrun.buckets import BucketError, answer

    with pytest.raises(BucketError, match=error):
        answer(data, "the write of k")


def test_a_delivery_without_a_jetstream_reply_is_one_sentence():
    from loomrun.buckets import BucketError, delivery

    with pytest.raises(BucketError, match="not a JetStream reply subject"):
        delivery("_INBOX.x")
