"""The races the stress suite (tests/stress) looks for by the dozen, each made to show every
time and checked in seconds: concurrent starters of the bundled broker, and a starter
killed once its broker runs. Each test has a state directory of its own, and ends when
nothing of it is left (tests/leftovers.py)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys

import pytest
from conftest import LOOMRUN, SCRIPTS
from leftovers import processes_of, wait_clean

from loomrun.launch import free_port

# Held between claiming a broker's start and starting it, in every starter: without the
# start lock, two starters would each start a server (the race once seen: the loser's
# record named its dead server, and nobody stopped the winner's).
RACE = {"LOOMRUN_TEST_BROKER_START_DELAY": "0.4"}

STARTER = """
import sys
from loomrun.broker import BrokerError
from loomrun.broker.bundled import BundledBroker
try:
    BundledBroker.start(int(sys.argv[1]))
    print("started", flush=True)
except BrokerError as error:
    print("shared" if "already answers" in str(error) else f"failed: {error}", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def fresh(tmp_path):
    state = tmp_path / "state"
    port = free_port()
    env = {**os.environ, "XDG_STATE_HOME": str(state), "LOOMRUN_NATS": f"nats://127.0.0.1:{port}"}
    yield state, port, env
    for pid, _ in processes_of(state):
        os.kill(pid, signal.SIGKILL)


def starter(env, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", STARTER, str(port)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def servers(state) -> list[int]:
    return [
        pid for pid, command in processes_of(state) if command.split()[0].endswith("nats-server")
    ]


def test_two_starters_at_once_start_one_server_which_stops_with_its_last_user(fresh):
    state, port, env = fresh
    first, second = starter({**env, **RACE}, port), starter({**env, **RACE}, port)
    said = sorted([first.stdout.readline().strip(), second.stdout.readline().strip()])
    assert said == ["shared", "started"]
    assert len(servers(state)) == 1
    record = state / "loomrun" / f"broker-{os.uname().nodename}-{port}.pid"
    assert int(record.read_text()) == servers(state)[0], "the record names the live server"
    for proc in (first, second):
        proc.communicate("")  # each ends without leaving: its keeper sees it gone
    wait_clean(state, [])
    assert not record.exists()


def test_a_starter_killed_once_its_broker_runs_leaves_no_broker(fresh):
    state, port, env = fresh
    proc = starter(env, port)
    assert proc.stdout.readline().strip() == "started"
    assert servers(state)
    proc.kill()
    proc.wait()
    wait_clean(state, [])


def test_two_nodes_started_at_once_start_one_broker_and_leave_nothing(fresh):
    state, _, env = fresh
    job = f"race-{secrets.token_hex(3)}"
    master = free_port()
    nodes = [
        subprocess.Popen(
            [*LOOMRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
             "--master-addr", "127.0.0.1", "--master-port", str(master), "--job", job,
             str(SCRIPTS / "no_torch.py"), "--seconds", "2"],
            env={**env, **RACE}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    errors = [node.communicate(timeout=120)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors
    assert sum("started the bundled NATS broker" in err for err in errors) == 1, errors
    wait_clean(state, [job])
