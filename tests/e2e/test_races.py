"""The races the stress suite (tests/stress) looks for by the dozen, each made to show every
time and checked in seconds: concurrent starters of the bundled broker, a starter killed
once its broker runs, and a node whose supervisor is killed mid-run. Each test has a state
directory of its own, and ends when nothing of it is left (tests/leftovers.py)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest
from conftest import SCRIPTS, wait_for
from leftovers import fresh_state, kill_left, processes_of, wait_clean
from nodes import start_nodes, stepping

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
    state, port, env = fresh_state(tmp_path)
    yield state, port, env
    kill_left(state)


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
    nodes = start_nodes(
        {**env, **RACE}, job, SCRIPTS / "no_torch.py", "--seconds", 2, master=master
    )
    errors = [node.communicate(timeout=120)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors
    assert sum("started the bundled NATS broker" in err for err in errors) == 1, errors
    wait_clean(state, [job])


def test_a_job_that_ends_while_its_broker_starts_still_says_it_started_one(fresh):
    """Found by `make stress` (1 of 50 four-jobs trials): a job of 50 quick steps ended
    while its start of the bundled broker was under way; the others shared that broker,
    and no job said it had started one. The start is held open here, so the script ends
    during it every time."""
    state, _, env = fresh
    job = f"ends-{secrets.token_hex(3)}"
    slow = {**env, "LOOMRUN_TEST_BROKER_START_DELAY": "3"}
    sup = subprocess.Popen(
        [sys.executable, "-m", "loomrun.cli", "--job", job, str(SCRIPTS / "no_torch.py")],
        env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _, err = sup.communicate(timeout=120)
    assert sup.returncode == 0, err
    assert err.count("started the bundled NATS broker") == 1, err
    wait_clean(state, [job])


@pytest.mark.slow
def test_a_node_whose_supervisor_is_killed_stops_the_other_and_nothing_is_left(fresh):
    """Node 1's supervisor SIGKILLed mid-run says nothing to node 0; node 0 sees its
    heartbeat stop, and stops as for a node failure that gave up (exit 1), restarts left or
    not: a group cannot form again without the node (docs/architecture.md)."""
    state, _, env = fresh
    job = f"lost-{secrets.token_hex(3)}"
    master = free_port()
    args = ["--steps", 1000000, "--step-time", 0.01]
    nodes = start_nodes(
        env, job, SCRIPTS / "ddp_seeded.py", *args, extra=["--max-restarts", 1], master=master
    )
    mid_run = lambda: stepping(job, "r0", 300) and stepping(job, "r1", 300)  # noqa: E731
    wait_for(mid_run, 120, what="both ranks a few heartbeats in")
    nodes[1].kill()
    killed = time.monotonic()
    _, err = nodes[0].communicate(timeout=60)
    stopped = time.monotonic() - killed
    print(f"node 0 stopped {stopped:.1f} s after node 1's supervisor was killed")
    assert nodes[0].returncode == 1, err
    assert "node 1: its supervisor is gone (no heartbeat for 10 s)" in err, err
    nodes[1].communicate(timeout=10)
    wait_clean(state, [job])
