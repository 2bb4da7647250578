"""The fault suite: what a long training run meets, each tried for real, and what was lost
(the goal is nothing). Real nats-server, real workers, real torch; bounded in time."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LOOMRUN, SCRIPTS, run_loomrun, wait_for
from jobs import events, job_id, start, steering, wait_ready
from netcut import CuttableProxy, HangingUp

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.broker.bundled import BundledBroker
from loomrun.broker.connect import answers
from loomrun.launch import free_port
from loomrun.mailbox import Mailbox, find_segment


def step_rate(job: str, replica: str = "r0", seconds: float = 2.0) -> float:
    """Steps per second, read off the step counter in the replica's mailbox (read only)."""
    box = Mailbox.attach(find_segment(job, replica))
    try:
        first, started = box.step[0], time.monotonic()
        wait_for(lambda: time.monotonic() - started >= seconds, seconds + 5, interval=0.1)
        return (box.step[0] - first) / (time.monotonic() - started)
    finally:
        box.close()


def values(job: str, url: str | None = None) -> dict[tuple[str, str], object]:
    args = ["get", "--job", job, "--json", *(["--nats", url] if url else [])]
    got = run_loomrun(*args)
    assert got.returncode == 0, got.stderr
    return {(p["replica"], p["name"]): p["value"] for p in json.loads(got.stdout)["params"]}


@pytest.mark.slow
def test_a_worker_killed_mid_step_restarts_with_every_change(procs):
    job = job_id("kill9")
    sup = start(
        procs, SCRIPTS / "steered.py", "--steps", "1000000", "--step-time", "0.01",
        job=job, replicas=2, extra=("--max-restarts", "1"),
    )  # fmt: skip
    wait_ready(job, ("r0", "r1"), name="batch")
    wait_ready(job, ("r0", "r1"))
    changed = run_loomrun("set", "lr=0.05", "batch=16", "--job", job)
    assert changed.returncode == 0, changed.stdout + changed.stderr

    async def pid_of(s):
        return (await s.statuses(job))["r1"].pid

    os.kill(steering(pid_of), signal.SIGKILL)
    wait_for(
        lambda: any(e.kind == "restarted" and e.replica == "r1" for e in events(job)),
        30, what="the group to restart",
    )  # fmt: skip
    failed = [e for e in events(job) if e.replica == "r1" and e.kind == "failed"]
    assert failed and "SIGKILL" in failed[0].text, failed
    wait_ready(job, ("r0", "r1"))
    assert values(job)[("r0", "lr")] == 0.05 and values(job)[("r1", "lr")] == 0.05
    assert values(job)[("r1", "batch")] == 16 and values(job)[("r0", "batch")] == 16
    sup.send_signal(signal.SIGTERM)
    out, _ = sup.communicate(timeout=60)
    restarted = out[out.rindex("[r1] used 1 ") :]
    assert restarted.startswith("[r1] used 1 0.05 batch 16"), restarted[:80]


def test_a_restarted_worker_starts_from_what_is_in_effect_not_from_a_rejected_change(procs):
    """`set` said rejected (the handler refused the value): the worker restarted after a
    failure applies the change in effect before it, and not the rejected one again. A
    method handler's value reaches the instance the restarted script makes (it was
    refused, as the class was still being made)."""
    job = job_id("rejected")
    sup = start(procs, SCRIPTS / "declared.py", job=job, extra=("--max-restarts", "1"))
    wait_ready(job, name="batch_size")
    assert run_loomrun("set", "batch_size=64", "dropout=high", "--job", job).returncode == 0
    refused = run_loomrun("set", "batch_size=-5", "--job", job, "--json")
    (change,) = json.loads(refused.stdout)["changes"]
    assert refused.returncode == 1 and change["state"] == "rejected", refused.stdout

    async def pid_of(s):
        return (await s.statuses(job))["r0"].pid

    os.kill(steering(pid_of), signal.SIGKILL)
    wait_for(
        lambda: any(e.kind == "restarted" for e in events(job)), 30, what="the restart"
    )  # fmt: skip
    wait_ready(job, name="batch_size")
    sup.send_signal(signal.SIGTERM)
    out, _ = sup.communicate(timeout=60)
    assert out.count("batch_size -> 64") == 2, out[-2000:]
    assert out.count("dropout -> high") == 2, out[-2000:]
    logged = map(json.loads, run_loomrun("log", "--job", job, "--json").stdout.splitlines())
    answers = [r["outcome"] for r in logged if r["change_id"] == change["change_id"]]
    assert answers == ["rejected"], "one answer, and none again after the restart"


@pytest.mark.slow
def test_a_broker_outage_costs_no_steps_and_loses_no_change(procs):
    port = free_port()
    broker = BundledBroker.start(port)
    proxy = CuttableProxy(port)
    direct = f"nats://127.0.0.1:{port}"
    try:
        job = job_id("outage")
        env = {"LOOMRUN_NATS": f"nats://127.0.0.1:{proxy.port}"}
        sup = start(
            procs, SCRIPTS / "steered.py", "--steps", "10000000", "--step-time", "0.002",
            "--quiet", job=job, env=env,
        )  # fmt: skip
        wait_ready(job, url=direct)
        before = step_rate(job, seconds=2)
        proxy.cut()  # the broker is gone for the supervisor, until the workers stepped on
        queued = run_loomrun("set", "lr=0.0456", "--job", job, "--nats", direct, "--no-wait")
        assert queued.returncode == 0, queued.stdout + queued.stderr
        box = Mailbox.attach(find_segment(job, "r0"))
        try:  # a boundary that waited on the broker would not step at all in the outage
            first, cut_at = box.step[0], time.monotonic()
            wait_for(lambda: box.step[0] >= first + 1500, 60, interval=0.1,
                     what="1500 steps in the outage")  # fmt: skip
            during = (box.step[0] - first) / (time.monotonic() - cut_at)
        finally:
            box.close()
        print(f"{during:.0f} steps/s in the outage, {before:.0f} before (a figure, not a check)")
        proxy.restore()
        wait_for(
            lambda: values(job, direct)[("r0", "lr")] == 0.0456, 30, interval=0.3,
            what="the change queued in the outage to apply",
        )  # fmt: skip

        async def fresh(s):
            return time.time() - (await s.statuses(job))["r0"].time < 2

        wait_for(lambda: steering(fresh, direct), 10, what="status to flow again")
        answered = run_loomrun("set", "lr=0.0789", "--job", job, "--nats", direct)
        assert answered.returncode == 0 and "0.0456 -> 0.0789" in answered.stdout
        assert sup.poll() is None
    finally:
        proxy.close()
        broker.stop()


def test_a_job_that_hears_late_that_its_bundled_broker_stopped_starts_it_again(procs):
    """The job that stops a shared bundled broker removes its record as it goes; a job
    kept off the CPU meanwhile hears of the loss only after that, and still starts the
    broker again (it once asked the record at that moment, found none, and ran on
    without a broker for good)."""
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    broker = BundledBroker.start(port)
    job = job_id("late")
    try:
        sup = start(
            procs, SCRIPTS / "steered.py", "--steps", "10000000", "--quiet", job=job,
            env={"LOOMRUN_NATS": url},
        )  # fmt: skip
        wait_ready(job, url=url)
        sup.send_signal(signal.SIGSTOP)  # off the CPU, as on a loaded machine
        try:
            broker.stop()  # as the last other user would: the server, then its record
        finally:
            sup.send_signal(signal.SIGCONT)
        wait_for(lambda: answers("127.0.0.1", port), 30, interval=0.2, what="a broker again")
        wait_ready(job, url=url, timeout=30)  # and the job on it again (its buckets made anew)
        result = run_loomrun("set", "lr=0.0432", "--job", job, "--nats", url, "--timeout", "30")
        assert result.returncode == 0 and "0.1 -> 0.0432" in result.stdout, result.stderr
        assert sup.poll() is None
    finally:
        broker.stop()


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (threads it makes later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)


@pytest.mark.slow
def test_a_flood_of_sets_from_four_clients_is_answered_in_full(procs, session_broker):
    job = job_id("flood")
    sup = start(
        procs, SCRIPTS / "steered.py", "--steps", "10000000", "--step-time", "0.005", "--quiet",
        job=job,
    )  # fmt: skip
    wait_ready(job)

    async def pid_of(s):
        return (await s.statuses(job))["r0"].pid

    # As on a training machine, the broker and the steering clients do not share the
    # trainer's core: what is measured is what steering costs the worker itself (its step
    # boundary, reading and applying 2,000 changes), not a 2-core machine's scheduling.
    cores = sorted(os.sched_getaffinity(0))
    trainer, rest = {cores[-1]}, set(cores[:-1]) or {cores[-1]}
    _pin(steering(pid_of), trainer)
    for pid in (sup.pid, session_broker.pid, os.getpid()):
        _pin(pid, rest)
    box = Mailbox.attach(find_segment(job, "r0"))
    try:
        before = step_rate(job, seconds=3)
        first = box.step[0]
        flood = subprocess.Popen(
            [sys.executable, SCRIPTS / "flood_clients.py", job, os.environ["LOOMRUN_NATS"],
             "4", "500"],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        _pin(flood.pid, rest)
        during = step_rate(job, seconds=3)
        out, _ = flood.communicate(timeout=150)
        stepped = box.step[0] - first
    finally:
        box.close()
        for pid in (session_broker.pid, os.getpid()):
            _pin(pid, set(cores))
    assert flood.returncode == 0
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == 2000, "every call answered"
    states = {state for state, _, _ in results}
    assert states <= {"applied", "superseded"}, states
    _, _, last = max(results, key=lambda r: r[1])
    assert values(job)[("r0", "lr")] == last, "the last one written is in effect"
    # Training went on through the flood; what it cost is a figure, not a check.
    assert stepped >= 100, f"{stepped} steps while 2,000 changes were applied"
    print(f"{during:.0f} steps/s in the flood, {before:.0f} before (a figure, not a check)")


def test_a_broker_that_hangs_up_mid_command_is_one_line_and_exit_4():
    """A server that greets as NATS, takes the CONNECT, then closes: every command says so
    in one line (`ls` and `log --metrics` once ended in nats-py's traceback)."""
    server = HangingUp({"server_id": "x", "version": "2.10.0", "proto": 1, "max_payload": 1 << 20})
    url = f"nats://127.0.0.1:{server.port}"
    try:
        # A job named: `log` falls back to its files on disk when the broker cannot answer.
        for command, codes in ((["ls"], {4}), (["set", "lr=0.1"], {4}),
                               (["log", "--metrics", "--job", "j"], {2, 4})):  # fmt: skip
            result = run_loomrun(*command, "--nats", url, timeout=60)
            assert result.returncode in codes, (command, result.stderr)
            said = [line for line in result.stderr.splitlines() if line.startswith("Error")]
            assert "Traceback" not in result.stderr and len(said) == 1, result.stderr
    finally:
        server.close()


def test_another_users_commands_are_refused_in_one_sentence(tmp_path):
    other = {"XDG_STATE_HOME": str(tmp_path / "state"), "HOME": str(tmp_path)}
    for command in (["set", "lr=0.1", "--job", "any"], ["pause", "--job", "any"], ["ls"], ["get"]):
        result = run_loomrun(*command, env=other)
        assert result.returncode == 4, (command, result.stdout, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr
        assert "refused this user's credentials" in result.stderr


def test_what_the_broker_says_is_printed_safely(procs):
    job = job_id("escape")
    start(procs, SCRIPTS / "steered.py", "--steps", "10000000", job=job)
    wait_ready(job)
    evil = "x\x1b]0;owned\x07\x1b[2J\r"

    async def plant(s):
        info = pb.JobInfo(job=job + "-evil", host=evil, script=evil, replicas=["r0"],
                          heartbeat=time.time(), started=time.time())  # fmt: skip
        await (await s.kv(S.JOBS)).put(f"{job}-evil.n0", info.SerializeToString())
        event = pb.Event(job=job, replica="r0", kind="applied", text=evil, time=time.time())
        await s.nc.publish(S.events(job, "r0"), event.SerializeToString())
        await s.nc.flush()

    steering(plant)
    for command in (["ls"], ["watch", "--once", "--job", job], ["watch", "--once"]):
        result = run_loomrun(*command)
        assert "\x1b" not in result.stdout and "\r" not in result.stdout, command
        assert "\\x1b" in result.stdout or command[0] == "watch", (command, result.stdout)


@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's file needs root")
def test_segment_names_another_user_took_beforehand_do_not_stop_a_job(tmp_path):
    """The names an attacker could guess (the job's and replica's, with or without our uid)
    are not the names loomrun uses; and another user's files are left alone."""
    job = job_id("squat")
    squatted = [f"/dev/shm/loomrun-{job}-r0", f"/dev/shm/loomrun-{os.getuid()}-{job}-r0"]
    for path in squatted:
        with open(path, "w") as f:
            f.write("not yours")
        os.chown(path, 54321, 54321)  # another user's file (we are root in the sandbox)
    try:
        result = run_loomrun("--no-broker", "--job", job, SCRIPTS / "exit_with.py", "0")
        assert result.returncode == 0, result.stderr
        assert all(os.path.exists(p) for p in squatted), "another user's files are theirs"
    finally:
        for path in squatted:
            os.unlink(path)


@pytest.mark.slow
def test_a_hung_replica_is_shown_and_restarted_with_step_timeout(procs):
    job = job_id("hang")
    sup = start(
        procs, SCRIPTS / "hangs.py", job=job, env={"LOOMRUN_HANG_AFTER": "1"},
        extra=("--step-timeout", "5", "--max-restarts", "1", "--grace", "1"),
    )  # fmt: skip

    def state():
        result = run_loomrun("watch", "--once", "--json", "--job", job)
        if result.returncode != 0:
            return None
        replicas = json.loads(result.stdout)["jobs"][0]["replicas"]
        return replicas[0]["state"] if replicas else None  # not listed yet, right at start

    wait_for(lambda: state() == "hung", 30, interval=0.2, what="r0 shown as hung")
    listed = {j["job"]: j for j in json.loads(run_loomrun("ls", "--json").stdout)["jobs"]}
    assert listed[job]["state"] == "running, r0 hung", listed[job]
    out, err = sup.communicate(timeout=90)
    assert sup.returncode == 0, err
    assert "no step for 5s (--step-timeout)" in err and "restarting all replicas" in err
    assert "finished" in out


def test_what_a_dead_job_left_goes_its_segments_at_the_next_start(tmp_path):
    """The broker it started goes by itself: its keeper sees no live user left."""
    state = tmp_path / "state"
    env = {**os.environ, "XDG_STATE_HOME": str(state)}
    port = free_port()
    code = (
        "import os; from pathlib import Path; from loomrun.broker.bundled import BundledBroker; "
        "from loomrun.mailbox import Mailbox, new_segment_path; "
        f"BundledBroker.start({port}); Mailbox.create(new_segment_path('dead', 'r0')); "
        "os._exit(0)"  # dies holding both, as a SIGKILL would leave them
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    record = state / "loomrun" / f"broker-{os.uname().nodename}-{port}.pid"
    wait_for(lambda: not answers("127.0.0.1", port) and not record.exists(), 10,
             what="the broker's keeper to stop it")  # fmt: skip
    result = run_loomrun(
        "--no-broker", SCRIPTS / "exit_with.py", "0", env={"XDG_STATE_HOME": str(state)}
    )
    assert result.returncode == 0, result.stderr
    assert "removed 1 shared-memory segment(s) left by loomrun jobs that died" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}: Address already in use"),
        (["--listen", "no such host"], "cannot listen on no such host:"),
        (["--cluster", "garbage", "--routes", "nats://127.0.0.1:6222"], "is not HOST:PORT"),
        (["--cluster", "127.0.0.1:{free}"], "--cluster needs --routes"),
        (["--cluster-name", "a b"], "'a b' is not a cluster name"),
    ],
)
def test_loomrun_server_says_what_is_wrong_before_it_starts(tmp_path, args, message):
    """In one line, before it says it runs (the broker's own fatal line came last of 26)."""
    import socket

    busy = socket.create_server(("127.0.0.1", 0))
    ports = {"busy": busy.getsockname()[1], "free": free_port()}
    try:
        argv = [a.format(**ports) for a in args]
        result = run_loomrun("server", "--port", ports["free"], *argv, timeout=30,
                             env={"XDG_STATE_HOME": str(tmp_path)})  # fmt: skip
    finally:
        busy.close()
    assert result.returncode == 2, result.stderr
    assert message.format(**ports) in result.stderr and "NATS broker on" not in result.stderr


def test_loomrun_server_requires_the_secret_and_says_how_to_connect(tmp_path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    port = free_port()
    server = subprocess.Popen(
        [*LOOMRUN, "server", "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        said = server.stderr.readline() + server.stderr.readline()
        assert f"NATS broker on nats://127.0.0.1:{port}" in said
        assert "your loomrun commands here connect as they are" in said
        wait_for(lambda: answers("127.0.0.1", port), 15, what="the server")
        url = f"nats://127.0.0.1:{port}"
        mine = subprocess.run(
            [*LOOMRUN, "ls", "--nats", url], env=env, capture_output=True, text=True
        )
        assert mine.returncode == 0 and "no loomrun job" in mine.stdout, mine.stderr
        other = run_loomrun("ls", "--nats", url, env={"XDG_STATE_HOME": str(tmp_path / "other")})
        assert other.returncode == 4 and "refused this user's credentials" in other.stderr
    finally:
        server.terminate()
        server.wait(15)


def _broker_pids(port: int) -> list[int]:
    """nats-server processes serving `port` (its config file is named after the port)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"nats-server" in cmdline and f"-{port}.conf".encode() in cmdline:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_a_job_stopped_while_its_broker_starts_leaves_no_broker(tmp_path):
    """SIGTERM as soon as the bundled nats-server process exists, before it answers: the
    supervisor waits for the start to end, and stops the broker it was the only user of."""
    port = free_port()
    env = {
        **os.environ,
        "XDG_STATE_HOME": str(tmp_path),
        "LOOMRUN_NATS": f"nats://127.0.0.1:{port}",
    }
    sup = subprocess.Popen(
        [*LOOMRUN, SCRIPTS / "steered.py", "--steps", "100000", "--quiet"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: _broker_pids(port), 60, interval=0.002, what="the broker process")
        sup.send_signal(signal.SIGTERM)
        _, err = sup.communicate(timeout=60)
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)
    assert "Traceback" not in err, err
    wait_for(lambda: not _broker_pids(port), 10, what="no broker left")
