"""The bundled broker, for real: start nats-server on a free loopback port, use JetStream KV."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from conftest import pid_alive

from loomrun.broker import (
    BrokerError,
    BrokerOptions,
    BundledBroker,
    answers,
    connect_client,
    host_port,
    is_loopback,
    secret_path,
    state_dir,
)
from loomrun.supervisor import free_port


@pytest.fixture
def broker(tmp_path):
    started = BundledBroker.start(free_port(), store=tmp_path / "js")
    yield started
    started.stop()


def test_bundled_broker_serves_jetstream_key_value_on_loopback(broker):
    assert broker.url.startswith("nats://127.0.0.1:")
    assert answers(*host_port(broker.url))

    async def round_trip() -> bytes:
        nc = await nats.connect(**BrokerOptions(broker.url).connect_kwargs())
        try:
            kv = await nc.jetstream().create_key_value(bucket="loomrun_test")
            await kv.put("job.r0.lr", b"0.002")
            return (await kv.get("job.r0.lr")).value
        finally:
            await nc.close()

    assert asyncio.run(round_trip()) == b"0.002"


def test_a_client_without_the_owners_secret_cannot_connect(broker, tmp_path, monkeypatch):
    async def quiet(_error):
        return None

    async def plain() -> None:
        await nats.connect(broker.url, allow_reconnect=False, error_cb=quiet)

    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        asyncio.run(plain())
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "another-user"))  # another secret
    with pytest.raises(BrokerError, match="refused this user's credentials"):
        asyncio.run(connect_client(BrokerOptions(broker.url)))


def test_the_secret_is_private_and_off_every_command_line(broker):
    state = state_dir()
    assert state.stat().st_mode & 0o777 == 0o700
    secret = secret_path().read_text().strip()
    assert secret_path().stat().st_mode & 0o777 == 0o600
    for path in state.glob("nats-server-*.conf"):
        assert path.stat().st_mode & 0o777 == 0o600
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert secret.encode() not in cmdline.read_bytes(), cmdline
        except OSError:
            continue


def test_stop_ends_the_server(broker):
    pid = broker.process.pid
    broker.stop()
    assert not pid_alive(pid)
    assert not answers(*host_port(broker.url))


def test_a_port_with_a_broker_already_is_refused(broker, tmp_path):
    _, port = host_port(broker.url)
    with pytest.raises(BrokerError, match="already answers"):
        BundledBroker.start(port, store=tmp_path / "other")


def test_a_bad_store_is_a_clear_error(tmp_path):
    (tmp_path / "js").write_text("a file where the store directory should be")
    with pytest.raises(BrokerError, match="cannot use .* for the broker's store"):
        BundledBroker.start(free_port(), store=tmp_path / "js")


@pytest.mark.parametrize(
    "url, loopback",
    [("nats://127.0.0.1:4222", True), ("localhost:4222", True), ("nats://10.1.2.3", False)],
)
def test_urls(url, loopback):
    assert is_loopback(url) is loopback


@pytest.mark.parametrize("url", ["http://x:1", "nats://host:99999", "nats://"])
def test_bad_urls_are_one_line_errors(url):
    with pytest.raises(BrokerError):
        host_port(url)


def test_nats_is_imported_without_its_websocket_transport_and_aiohttp_still_works():
    import subprocess
    import sys

    code = (
        "import sys; from loomrun.broker import import_nats; import_nats(); "
        "loaded = 'aiohttp' in sys.modules; import aiohttp; print(loaded, aiohttp.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "aiohttp"], result.stderr
