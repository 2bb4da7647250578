"""Reaching a broker: URLs, the options of a connection, and connecting (TLS only when
asked for TLS)."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from loomrun.broker import BrokerError
from loomrun.broker.nats_import import import_nats
from loomrun.broker.state import local_secret

DEFAULT_URL = "nats://127.0.0.1:4222"


def host_port(url: str) -> tuple[str, int]:
    try:
        parsed = urlparse(url if "://" in url else f"nats://{url}")
    except ValueError:  # "nats://[::1": an address never closed
        raise BrokerError(f"'{url}' is not a NATS URL (expected nats://HOST:PORT)") from None
    if parsed.scheme not in ("nats", "tls") or not parsed.hostname:
        raise BrokerError(f"'{url}' is not a NATS URL (expected nats://HOST:PORT or tls://...)")
    try:
        port = parsed.port or 4222
    except ValueError:
        raise BrokerError(f"'{url}' has a bad port (expected 1-65535)") from None
    return parsed.hostname, port


def is_loopback(url: str) -> bool:
    return loopback_host(host_port(url)[0])


def loopback_host(host: str) -> bool:
    """By address, never by the look of a name: `127.example.com` is a remote host."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reach(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to host:port. An ASCII host goes to the lookup as bytes: the same
    lookup, without loading Python's IDNA codec (3 ms, 9 while workers start), which a
    name given as text always costs."""
    name = host.encode() if host.isascii() else host
    return socket.create_connection((name, port), timeout=timeout)


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a NATS server greets us at host:port (it sends INFO on connect)."""
    try:
        with reach(host, port, timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(4).startswith(b"INFO")
    except OSError:
        return False


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
        token = self.token
        if token is None and not self.creds and is_loopback(self.url):
            token = local_secret(create=False)  # the bundled broker of this user
        if token:
            kwargs["token"] = token
        if self.ca or self.url.startswith("tls://"):
            import ssl

            kwargs["tls"] = ssl.create_default_context(cafile=self.ca)
        return kwargs


async def open_connection(options: BrokerOptions, **settings):
    """nats.connect, except that a connection told to use TLS (a tls:// URL, or a CA) never
    goes on in clear: nats-py upgrades only when the server asks it to, so a server that
    does not would get the token in clear."""
    nats = import_nats()
    kwargs = options.connect_kwargs()
    client = _tls_only()() if "tls" in kwargs else nats.NATS()
    await client.connect(**kwargs, **settings)
    return client


def several_filters(nc) -> bool:
    """The server takes several filter subjects on one consumer (NATS 2.10 and later)."""
    version = nc.connected_server_version
    return (version.major, version.minor) >= (2, 10)


@functools.cache
def _tls_only():
    from nats.aio.client import Client
    from nats.errors import Error

    class TLSOnly(Client):
        """Refuses, before its CONNECT line (and credentials) is sent, a server that does
        not require TLS: at each connection, reconnections included."""

        async def _process_info(self, info, initial_connection=False):
            if initial_connection and not info.get("tls_required"):
                raise Error("does not offer TLS: nothing was sent to it")
            await super()._process_info(info, initial_connection)

    return TLSOnly


def refused(url: str) -> BrokerError:
    return BrokerError(
        f"the NATS broker at {url} refused this user's credentials: it belongs to another "
        "user (or another state directory), or needs LOOMRUN_NATS_TOKEN or --nats-creds"
    )


async def connect_client(options: BrokerOptions, timeout: float = 3.0, reconnect: bool = False):
    """A connection for a command: fails fast with one line when nobody answers. A
    long-lived face (`watch`, `ui`) asks to `reconnect` after the broker went away."""

    async def quiet(_error):
        return None

    host, port = host_port(options.url)
    try:
        reach(host, port, min(timeout, 1.0)).close()
    except OSError:
        raise BrokerError(
            f"cannot reach the NATS broker at {options.url} (nothing answers there); is a "
            "loomrun job running? (set --nats or LOOMRUN_NATS to point at its broker)"
        ) from None
    try:
        return await asyncio.wait_for(
            open_connection(
                options,
                connect_timeout=timeout,
                allow_reconnect=reconnect,
                max_reconnect_attempts=-1 if reconnect else 1,
                reconnect_time_wait=0.5,
                error_cb=quiet,
            ),
            timeout,
        )
    except Exception as error:  # noqa: BLE001 - every way to fail is one sentence here
        detail = str(error) or type(error).__name__
        if isinstance(error, asyncio.TimeoutError | ConnectionRefusedError | OSError):
            detail = "nothing answers there"
        if "authorization" in detail.lower():
            raise refused(options.url) from None
        if "does not offer TLS" in detail:
            raise BrokerError(f"the NATS broker at {options.url} {detail}") from None
        raise BrokerError(
            f"cannot reach the NATS broker at {options.url} ({detail}); is a loomrun job "
            "running? (set --nats or LOOMRUN_NATS to point at its broker)"
        ) from None
