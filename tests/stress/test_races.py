"""Races of start-up, by the dozen: supervisors started at one moment on one host, and
supervisors killed at random moments of their start-up. After each trial nothing of it
may be left (tests/leftovers.py), and the time that took is the cleanup figure."""

from __future__ import annotations

import random
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from leftovers import fresh_state, kill_left, leftovers, processes_of, wait_clean
from nodes import start_nodes, stepping
from trials import trials

from loomrun.launch import free_port

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SCRIPT = SCRIPTS / "no_torch.py"
STARTED_BROKER = "started the bundled NATS broker"


def start(env: dict, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "loomrun.cli", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.fixture
def fresh(tmp_path):
    state, _, env = fresh_state(tmp_path)
    yield state, env
    kill_left(state)


def finish(trial, state: Path, jobs: list[str], procs: list[subprocess.Popen]) -> list[str]:
    """Wait for the supervisors, then for nothing of the jobs to be left; their stderr."""
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        errors.append(err)
    try:
        trial.cleanup = wait_clean(state, jobs)
    except AssertionError:
        trial.left = leftovers(state, jobs)
        raise
    for proc, err in zip(procs, errors, strict=True):
        assert proc.returncode == 0, err
    return errors


@pytest.mark.kind("two-nodes", "two nodes of one job started at one moment")
@pytest.mark.parametrize("number", trials(50))
def test_two_nodes_started_at_once_start_one_broker_and_leave_nothing(number, trial, fresh):
    state, env = fresh
    job = f"two-{secrets.token_hex(3)}"
    master = free_port()
    nodes = start_nodes(env, job, SCRIPT, master=master)
    errors = finish(trial, state, [job], nodes)
    assert sum(STARTED_BROKER in err for err in errors) == 1, errors


@pytest.mark.kind("four-jobs", "four jobs on one host started at one moment")
@pytest.mark.parametrize("number", trials(50))
def test_four_jobs_started_at_once_share_one_broker_and_leave_nothing(number, trial, fresh):
    state, env = fresh
    jobs = [f"four{i}-{secrets.token_hex(3)}" for i in range(4)]
    procs = [start(env, "--replicas", "1", "--job", job, SCRIPT) for job in jobs]
    errors = finish(trial, state, jobs, procs)
    assert sum(STARTED_BROKER in err for err in errors) == 1, errors


def _what_runs(state: Path) -> str:
    """The parts of a start-up that exist at this moment, besides the supervisor."""
    parts = {
        "watchdog.py": "watchdog",
        "keeper.py": "broker keeper",
        "loomrun.rendezvous": "rendezvous",
        "runtime.boot": "worker",
    }
    up = set()
    for _, command in processes_of(state):
        if command.split()[0].endswith("nats-server"):
            up.add("broker")
        words = command.split()[:4]  # the program, not its arguments
        up.update(name for key, name in parts.items() if any(key in word for word in words))
    up = sorted(up)
    return ", ".join(up) or "nothing but the supervisor"


@pytest.mark.kind("kill-start", "supervisor SIGKILLed at a random moment of start-up")
@pytest.mark.parametrize("number", trials(100))
def test_a_supervisor_killed_during_start_up_leaves_nothing(number, trial, fresh):
    """A third of the trials start one node of a two-node c10d job, which waits in the
    rendezvous for the other; the rest start two replicas and their broker, a third with
    the broker's start held open for 0.3 s (a wider window to be killed in)."""
    state, env = fresh
    job = f"kill-{secrets.token_hex(3)}"
    if number % 3 == 2:
        shape = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                 "--rdzv-id", job, "--nnodes", "2", "--nproc-per-node", "1"]  # fmt: skip
    else:
        shape = ["--replicas", "2"]
    delay = random.Random(number).uniform(0.0, 1.0)
    if number % 3 == 1:
        env = {**env, "LOOMRUN_TEST_BROKER_START_DELAY": "0.3"}
    sup = start(env, *shape, "--job", job, SCRIPT, "--forever")
    time.sleep(delay)  # the random moment itself: what is tested is what it hits
    running = _what_runs(state)
    sup.kill()
    _, err = sup.communicate(timeout=30)
    assert sup.returncode == -signal.SIGKILL, f"it ended before the kill: {err}"
    killed = time.monotonic()
    trial.moment = f"trial {number}: {delay * 1000:4.0f} ms after the start; up: {running}"
    clean_after_kill(trial, state, job, killed)


def clean_after_kill(trial, state: Path, job: str, killed: float) -> None:
    """Wait until nothing of the job is left; the seconds since the kill are the trial's
    cleanup figure, what is left its leftovers."""
    try:
        wait_clean(state, [job], timeout=15)
    except AssertionError:
        trial.left = leftovers(state, [job])
        raise
    finally:
        trial.cleanup = time.monotonic() - killed


def _until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the job did not start stepping"
        time.sleep(0.1)


@pytest.mark.timeout(360)
@pytest.mark.kind("node-killed", "a node's supervisor SIGKILLed mid-run (2 nodes, DDP)")
@pytest.mark.parametrize("number", trials(20))
def test_a_node_killed_mid_run_stops_the_other_within_bounds(number, trial, fresh):
    """The design (docs/architecture.md, "A node that is gone"): node 0 stops and exits 1
    once node 1's heartbeat has stopped for 10 s, restarts left or not."""
    state, env = fresh
    job = f"lost-{secrets.token_hex(3)}"
    args = ["--steps", 1000000, "--step-time", 0.01]
    nodes = start_nodes(env, job, SCRIPTS / "ddp_seeded.py", *args,
                        extra=["--max-restarts", 1], master=free_port())  # fmt: skip
    # mid-run: a few heartbeats in (see docs/architecture.md for a node lost sooner)
    _until(lambda: stepping(job, "r0", 300) and stepping(job, "r1", 300), 180)
    nodes[1].kill()
    killed = time.monotonic()
    try:
        _, err = nodes[0].communicate(timeout=60)
    except subprocess.TimeoutExpired:
        nodes[0].kill()
        raise AssertionError(f"node 0 did not stop: {nodes[0].communicate()[1][-2000:]}") from None
    trial.moment = f"trial {number}: node 0 stopped {time.monotonic() - killed:.1f} s after"
    nodes[1].communicate(timeout=10)
    clean_after_kill(trial, state, job, killed)
    assert nodes[0].returncode == 1, err
    assert "node 1: its supervisor is gone" in err, err
