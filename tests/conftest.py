"""Shared fixtures: run the real `loomrun` command, and clean up after it whatever happens."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from leftovers import pid_alive  # noqa: F401 - the tests' import of it

from loomrun.broker.bundled import BundledBroker
from loomrun.launch import free_port
from loomrun.mailbox import Mailbox, new_segment_path, sweep_stale

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"
EXAMPLES = ROOT / "examples"
LOOMRUN = [sys.executable, "-m", "loomrun.cli"]


FAKE_NVML = Path(__file__).resolve().parent / "fake_nvml"


@pytest.fixture(scope="session", autouse=True)
def session_broker(tmp_path_factory):
    """One real nats-server for the session, as a shared host broker; state kept out of ~."""
    state = tmp_path_factory.mktemp("state")
    os.environ["XDG_STATE_HOME"] = str(state)
    broker = BundledBroker.start(free_port())
    os.environ["LOOMRUN_NATS"] = broker.url
    yield broker
    broker.stop()


@pytest.fixture
def mailbox():
    """A fresh mailbox segment of this process, removed afterwards."""
    box = Mailbox.create(new_segment_path(f"test-{secrets.token_hex(4)}", "r0"))
    yield box
    box.unlink()


def shm_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("loomrun")}


@pytest.fixture(autouse=True)
def no_leftover_segments():
    """Every test must remove the shared-memory segments it made, on every exit path."""
    before = shm_segments()
    yield
    deadline = time.monotonic() + 5
    while (left := shm_segments() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"shared-memory segments left behind: {sorted(left)}"


class Processes:
    """Started supervisors; each is SIGKILLed with its whole group at the end of the test."""

    def __init__(self):
        self.started: list[subprocess.Popen] = []

    def start(self, *args: str, env: dict | None = None, cwd=None, **kwargs) -> subprocess.Popen:
        options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
        proc = subprocess.Popen(
            [*LOOMRUN, *map(str, args)],
            env={**os.environ, **(env or {})},
            cwd=cwd,
            text=True,
            start_new_session=True,
            **options,
        )
        self.started.append(proc)
        return proc

    def cleanup(self) -> None:
        """SIGTERM, as a user would stop a job; SIGKILL and a stale sweep if that fails."""
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.communicate(timeout=40)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate(timeout=10)
                sweep_stale()


@pytest.fixture
def procs():
    p = Processes()
    yield p
    p.cleanup()


def run_loomrun(*args, env=None, timeout=120, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LOOMRUN, *map(str, args)],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
