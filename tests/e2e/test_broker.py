"""The bundled broker, for real: start nats-server on a free loopback port, use JetStream KV."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import nats
import pytest
from conftest import pid_alive
from nats.js.errors import NotFoundError

from loomrun.broker import BrokerError
from loomrun.broker.bundled import BundledBroker
from loomrun.broker.connect import BrokerOptions, answers, connect_client, host_port
from loomrun.broker.state import secret_path, state_dir
from loomrun.launch import free_port


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
    pid = broker.pid
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


def test_nats_is_imported_without_websockets_or_metadata_and_both_still_work():
    import subprocess
    import sys

    code = (
        "import sys; from loomrun.broker.nats_import import import_nats; nats = import_nats(); "
        "loaded = 'aiohttp' in sys.modules or 'importlib.metadata' in sys.modules; "
        "import aiohttp, importlib.metadata as m; "
        "print(loaded, aiohttp.__name__, nats.aio.client.__version__ == m.version('nats-py'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "aiohttp", "True"], result.stderr


@pytest.mark.parametrize(
    "code",
    [
        # nats-py's own attribute path first, then an import of a submodule
        "a = nats.js.api.Header.STATUS; from nats.js.errors import BucketNotFoundError as B",
        # a submodule first: the package runs whole, before it (no circular import)
        "from nats.js.errors import BucketNotFoundError as B; a = nats.js.api.Header.STATUS",
        "from nats.js import errors; B = errors.BucketNotFoundError",
    ],
)
def test_jetstream_is_loaded_at_first_use_and_only_once(code):
    import subprocess
    import sys

    program = (
        "import sys; from loomrun.broker.nats_import import import_nats; nats = import_nats(); "
        "early = 'nats.js.api' in sys.modules; "
        f"{code}; "
        "same = B is sys.modules['nats.js.errors'].BucketNotFoundError "
        "and sys.modules['nats.js'] is nats.js and nats.js.JetStreamContext is not None; "
        "print(early, same)"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "True"], result.stderr


def test_buckets_read_and_write_what_nats_py_key_value_does(broker):
    from loomrun import buckets

    async def scenario():
        nc = await nats.connect(**BrokerOptions(broker.url).connect_kwargs())
        try:
            with pytest.raises(buckets.BucketMissing):
                await buckets.snapshot(nc, "loomrun_none", ">")
            with pytest.raises(buckets.BucketMissing):
                await buckets.put(nc, "loomrun_none", "a", b"1")
            kv = await nc.jetstream().create_key_value(bucket="loomrun_kv", history=1)
            assert await buckets.snapshot(nc, "loomrun_kv", ">") == {}
            first = await buckets.put(nc, "loomrun_kv", "job.r0.lr", b"0.1")
            second = await buckets.put(nc, "loomrun_kv", "job.r0.lr", b"0.2")
            assert second > first and (await kv.get("job.r0.lr")).revision == second
            await kv.put("job.r1.lr", b"0.3")
            await kv.put("job.r2.lr", b"0.4")
            await kv.delete("job.r2.lr")
            await kv.put("other.r0.lr", b"0.5")
            seen = await buckets.snapshot(nc, "loomrun_kv", "job.>")
            keys = await buckets.snapshot(nc, "loomrun_kv", "*.r0.*", keys_only=True)
            revisions = await buckets.entries(nc, "loomrun_kv", "job.>")
            assert revisions["job.r0.lr"] == (second, b"0.2")
            assert revisions["job.r1.lr"][0] == (await kv.get("job.r1.lr")).revision
            made = await buckets.made(nc, "loomrun_kv")
            assert made and made == await buckets.made(nc, "loomrun_kv")
            purged = await buckets.purge(nc, "loomrun_kv", "job.r1.lr")
            assert purged > revisions["job.r1.lr"][0]
            assert await buckets.put(nc, "loomrun_kv", "job.r1.lr", b"0.6") > purged
            with pytest.raises(NotFoundError):
                await kv.get("job.r1.lr", revision=revisions["job.r1.lr"][0])  # history gone
            await nc.jetstream().delete_key_value("loomrun_kv")
            await nc.jetstream().create_key_value(bucket="loomrun_kv", history=1)
            assert await buckets.made(nc, "loomrun_kv") != made, "another stream, told apart"
            deadline = asyncio.get_running_loop().time() + 5
            while (info := await nc.jetstream().stream_info("KV_loomrun_kv")).state.consumer_count:
                if asyncio.get_running_loop().time() > deadline:
                    break  # the deletes are sent without waiting; the server takes them soon
                await asyncio.sleep(0.01)
            return seen, keys, info.state.consumer_count
        finally:
            await nc.close()

    seen, keys, consumers = asyncio.run(scenario())
    assert seen == {"job.r0.lr": b"0.2", "job.r1.lr": b"0.3"}
    assert keys == {"job.r0.lr": b"", "other.r0.lr": b""}
    assert consumers == 0  # every read removed its consumer


def test_what_the_broker_refuses_is_left_out_and_the_rest_goes_on(broker, capsys):
    """A key no broker takes, a message over its largest payload: each is said and left
    out, and what was queued behind it is sent (it once held up the node for good)."""
    from types import SimpleNamespace

    from loomrun import subjects as S
    from loomrun._proto import loomrun_pb2 as pb
    from loomrun.control.outbox import Outbox

    async def work():
        nc = await nats.connect(**BrokerOptions(broker.url).connect_kwargs())
        try:
            js = nc.jetstream()
            kv = await js.create_key_value(bucket=S.STATE)
            got = await nc.subscribe("loomrun.j.outcomes.r0")
            outbox = Outbox(SimpleNamespace(nc=nc, kv={S.STATE: kv}))
            outbox.publish("loomrun.j.outcomes.r0", pb.Outcome(reason="x" * nc.max_payload))
            outbox.publish("loomrun.j.outcomes.r0", pb.Outcome(change_id="after"))
            outbox.put(S.STATE, "j.r0.outcome.bad name", pb.Outcome(change_id="bad"))
            outbox.put(S.STATE, "j.r0.outcome.lr", pb.Outcome(change_id="good"))
            await asyncio.wait_for(outbox.flush(), 10)
            sent = pb.Outcome.FromString((await got.next_msg(timeout=5)).data)
            kept = pb.Outcome.FromString((await kv.get("j.r0.outcome.lr")).value)
            return sent.change_id, kept.change_id
        finally:
            await nc.close()

    assert asyncio.run(work()) == ("after", "good")
    said = capsys.readouterr().err
    assert "left out a message on loomrun.j.outcomes.r0" in said
    assert "left out j.r0.outcome.bad name in loomrun_state" in said


def test_a_tls_url_gets_tls_or_nothing_is_sent(tmp_path):
    """With tls:// (or a CA), a real TLS server is used as such; a server that does not
    require TLS is refused before the token goes out (nats-py went on in clear)."""
    import shutil
    import subprocess

    from conftest import run_loomrun, wait_for
    from netcut import HangingUp

    from loomrun.broker.bundled import server_binary

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (make system installs it as root)")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "1", "-subj", "/CN=loomrun test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=127.0.0.1")  # fmt: skip
    (tmp_path / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-out",
            "server.pem", "-CAcreateserial", "-days", "1", "-extfile", "san.cnf")  # fmt: skip
    port, token = free_port(), "tls-test-token"
    config = tmp_path / "server.conf"
    config.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f'tls {{ cert_file: "{tmp_path / "server.pem"}", key_file: "{tmp_path / "server.key"}" }}\n'
        f'authorization {{ token: "{token}" }}\n'
        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
    )
    server = subprocess.Popen([str(server_binary()), "-c", str(config)], stderr=subprocess.DEVNULL)
    plain = HangingUp({"server_id": "x", "version": "2.10.0", "proto": 1, "auth_required": True})
    env = {"LOOMRUN_NATS_TOKEN": token}
    try:
        wait_for(lambda: answers("127.0.0.1", port), 10, what="the TLS server")
        ca = ["--nats-ca", str(tmp_path / "ca.pem")]
        listed = run_loomrun("ls", "--nats", f"tls://127.0.0.1:{port}", *ca, env=env)
        assert listed.returncode == 0, listed.stderr
        refused = run_loomrun("ls", "--nats", f"tls://127.0.0.1:{plain.port}", env=env)
        assert refused.returncode == 4 and "does not offer TLS" in refused.stderr, refused.stderr
        assert not any(token.encode() in data for data in plain.heard), plain.heard
    finally:
        plain.close()
        server.terminate()
        server.wait(10)


def _unread(port: int) -> int:
    """Bytes that reached the server's sockets on `port` and that it has not read."""
    unread = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # established
            unread += int(fields[4].split(":")[1], 16)
    return unread


def test_a_record_the_broker_died_holding_is_sent_again_and_kept_once(tmp_path, monkeypatch):
    """Found by make stress (the broker SIGKILLed in a flood of sets): ledger records were
    published plainly, and those the broker died holding unread were gone from its copy.
    Here the broker is frozen while a record reaches its socket, then killed, then started
    again on its store: the record is sent again until acked; and a record sent twice
    under one message id is kept once."""
    from types import SimpleNamespace

    from loomrun._proto import loomrun_pb2 as pb
    from loomrun.control import outbox as O

    monkeypatch.setattr(O, "ACK_TIMEOUT", 1.0)
    port, store = free_port(), tmp_path / "js"
    broker = BundledBroker.start(port, store=store)
    record = pb.Outcome(replica="r0", name="lr", state=pb.APPLIED, change_id="c1")

    async def until(predicate, what: str) -> None:
        for _ in range(500):
            if predicate():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"waited 10 s for {what}")

    async def flushed(outbox) -> None:
        for _ in range(50):  # as Outbox.run_records does: again after a failure
            try:
                return await outbox.flush_records()
            except Exception:  # noqa: BLE001 - reconnecting
                await asyncio.sleep(0.2)
        raise AssertionError("the outbox never got its records acked")

    async def work():
        nc = await nats.connect(
            **BrokerOptions(broker.url).connect_kwargs(), reconnect_time_wait=0.2,
            max_reconnect_attempts=-1,
        )  # fmt: skip
        try:
            js = nc.jetstream()
            await js.add_stream(name="T_LEDGER", subjects=["t.ledger.*"], duplicate_window=600)
            await js.publish("t.ledger.warm", b"")  # the client's reply inbox, subscribed
            outbox = O.Outbox(SimpleNamespace(nc=nc, js=js, kv={}))
            os.kill(broker.pid, signal.SIGSTOP)
            before = _unread(port)
            outbox.record("t.ledger.0", record, "run:r0:c1:applied")
            sending = asyncio.ensure_future(outbox.flush_records())
            await until(lambda: _unread(port) > before, "the record to reach the frozen broker")
            os.kill(broker.pid, signal.SIGKILL)
            with pytest.raises(asyncio.TimeoutError):
                await sending  # no ack: kept
            assert outbox.unacked == 1
            again = BundledBroker.start(port, store=store)
            try:
                await until(lambda: nc.is_connected, "the client to reconnect")
                await flushed(outbox)
                counts = [(await js.stream_info("T_LEDGER")).state.messages]
                outbox.record("t.ledger.0", record, "run:r0:c1:applied")  # sent twice
                await flushed(outbox)
                counts.append((await js.stream_info("T_LEDGER")).state.messages)
                return counts
            finally:
                again.stop()
        finally:
            await nc.close()

    try:
        assert asyncio.run(work()) == [2, 2], "the warm-up and the record, each once"
    finally:
        broker.stop()
