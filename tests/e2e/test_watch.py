"""`loomrun watch` and the demo, run for real; the model behind the view, unit-tested."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import secrets
import select
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
from conftest import EXAMPLES, LOOMRUN, ROOT, SCRIPTS, run_loomrun, wait_for
from jobs import start, steering, wait_ready


def job_id(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def snapshot(job: str) -> dict:
    result = run_loomrun("watch", "--once", "--json", "--job", job)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def rows_of(snap: dict) -> dict[str, dict]:
    (job,) = snap["jobs"]
    return {row["replica"]: row for row in job["replicas"]}


def test_once_plain_and_json_show_every_replica_and_the_change(procs):
    job = job_id("watch")
    start(
        procs,
        EXAMPLES / "train.py",
        "--steps",
        "100000",
        "--step-time",
        "0.005",
        job=job,
        replicas=2,
    )
    wait_ready(job, ("r0", "r1"))
    assert run_loomrun("set", "lr=0.004", "--replica", "r1", "--job", job).returncode == 0

    def settled():
        rows = rows_of(snapshot(job))
        return rows["r1"]["lr"] == 0.004 and all(r["steps_per_sec"] > 0 for r in rows.values())

    wait_for(settled, 15, interval=0.3, what="the change and step rates in the view")
    snap = snapshot(job)
    rows = rows_of(snap)
    assert set(rows) == {"r0", "r1"}
    for row in rows.values():
        assert row["state"] == "running" and row["step"] > 0 and row["device"] == "CPU"
        assert 0 < row["metrics"]["loss"] < 100 and row["age"] < 3 and row["restarts"] == 0
    assert rows["r0"]["lr"] == 0.01 and rows["r0"]["last_change"] is None
    assert rows["r1"]["last_change"].startswith("lr 0.01 -> 0.004 at step ")
    assert snap["metrics"][0] == "loss"
    assert any(e["kind"] == "applied" and e["replica"] == "r1" for e in snap["events"])

    plain = run_loomrun("watch", "--once", "--job", job)
    assert plain.returncode == 0
    assert "\x1b" not in plain.stdout, "no control codes when not a terminal"
    missing = run_loomrun("watch", "--once", "--job", job, "--replica", "r7")
    assert missing.returncode == 1 and f"job {job} has no replica r7" in missing.stderr
    lines = plain.stdout.splitlines()
    assert lines[0].startswith(f"{job}  running")
    assert re.search(r"^r1 .* running .* 0\.004 .*lr 0\.01 -> 0\.004", plain.stdout, re.M)


def test_failed_replica_shows_its_code_after_the_job_ended():
    job = job_id("failed")
    result = run_loomrun(
        "--replicas", "2", "--job", job, SCRIPTS / "exit_with.py", "3", env={"FAIL_RANK": "1"}
    )
    assert result.returncode == 3
    snap = snapshot(job)
    assert snap["jobs"][0]["state"] == "failed: 3"
    rows = rows_of(snap)
    assert rows["r1"]["state"] == "failed: 3" and rows["r1"]["exit_code"] == 3
    assert rows["r0"]["state"] == "stopped"
    listed = {j["job"]: j for j in json.loads(run_loomrun("ls", "--json").stdout)["jobs"]}
    assert listed[job]["state"] == "failed: 3"


def test_a_slow_step_is_not_stale_but_a_silent_supervisor_is(procs):
    job = job_id("stale")
    sup = start(
        procs, SCRIPTS / "steered.py", "--steps", "1000000", "--step-time", "6",
        job=job, replicas=2,
    )  # fmt: skip
    wait_ready(job, ("r0", "r1"))

    async def statuses(s):
        return await s.statuses(job)

    def long_in_a_step():
        found = steering(statuses)
        return all(st.time - st.status.time > 4 for st in found.values()) and len(found) == 2

    wait_for(long_in_a_step, 30, interval=0.2, what="4 s into a step with no new status")
    rows = rows_of(snapshot(job))
    assert {r["state"] for r in rows.values()} == {"running"}, rows
    assert all(r["age"] < 3 for r in rows.values()), "the heartbeat keeps the age low"
    sup.send_signal(signal.SIGSTOP)  # no more heartbeats
    try:
        wait_for(lambda: rows_of(snapshot(job))["r1"]["state"] == "stale", 15, what="stale")
    finally:
        sup.send_signal(signal.SIGCONT)
    wait_for(lambda: rows_of(snapshot(job))["r1"]["state"] == "running", 15, what="running")


@pytest.mark.slow
def test_a_job_whose_supervisor_vanished_shows_as_lost(procs):
    job = job_id("lost")
    sup = start(procs, SCRIPTS / "steered.py", "--steps", "1000000", job=job)
    wait_ready(job)
    sup.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: snapshot(job)["jobs"][0]["state"] == "lost", 30, interval=1, what="lost")
        assert rows_of(snapshot(job))["r0"]["state"] == "lost"
    finally:
        sup.send_signal(signal.SIGCONT)


def test_once_without_a_job_exits_1():
    result = run_loomrun("watch", "--once", "--job", "nosuchjob")
    assert result.returncode == 1
    assert "no job 'nosuchjob'" in result.stderr


def _read_pty(fd: int, seconds: float) -> bytes:
    out, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
    return out


def test_live_view_in_a_real_terminal(procs):
    job = job_id("live")
    sup = start(procs, SCRIPTS / "steered.py", "--steps", "1000000", job=job, replicas=2)
    wait_ready(job, ("r0", "r1"))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    watcher = subprocess.Popen(
        [*LOOMRUN, "watch", "--job", job],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "40"},
        start_new_session=True,
    )
    os.close(slave)
    try:
        screen = _read_pty(master, 5.0).decode("utf-8", "replace")
        assert "\x1b[" in screen, "a live view redraws with control codes"
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
        assert job in text and "replica" in text
        steps = [int(s) for s in re.findall(r"\br0 .*?running\s+(\d+)", text)]
        assert len(set(steps)) >= 2, f"the table must update; r0 steps seen: {steps}"
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
        os.close(master)
    assert sup.poll() is None, "closing the view never affects the job"


def _screen_rows(screen: str) -> dict[str, dict[str, str]]:
    """The replicas' rows on a captured screen, each as {column: cell}."""
    lines = screen.splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.startswith("replica ")]
    names = re.split(r"\s{2,}", lines[at].strip())
    rows = {}
    for line in lines[at + 1 :]:
        if not re.match(r"r\d+ ", line):
            break
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(names):
            raise ValueError(f"caught mid-redraw: {line!r}")  # read the screen again
        rows[cells[0]] = dict(zip(names, cells, strict=True))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [2, 8])
def test_the_live_view_reads_at_80_and_200_columns(procs, replicas):
    """In tmux, as a user sees it: every replica's step, loss and lr read back from the
    screen are the job's own; at 80 columns nothing of them is cut."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (make test installs it where it runs as root)")
    job = job_id("tmux")
    names = [f"r{i}" for i in range(replicas)]
    start(procs, SCRIPTS / "steered.py", "--steps", "10000000", "--quiet", job=job,
          replicas=replicas)  # fmt: skip
    wait_ready(job, names, timeout=120)
    assert run_loomrun("set", "lr=0.0123", "--replica", "r1", "--job", job).returncode == 0
    assert run_loomrun("pause", "--job", job).returncode == 0

    def settled():
        rows = rows_of(snapshot(job))
        done = all(r["state"] == "paused" and "loss" in r["metrics"] for r in rows.values())
        return rows if done and set(rows) == set(names) else None

    truth = wait_for(settled, 30, interval=0.3, what="every replica paused, with a loss")
    socket = f"loomrun-test-{secrets.token_hex(3)}"
    tmux = ["tmux", "-L", socket]
    env = [f"-e{k}={v}" for k, v in os.environ.items() if k.startswith(("LOOMRUN_", "XDG_"))]
    try:
        for width in (80, 200):
            command = shlex.join([*LOOMRUN, "watch", "--job", job])
            subprocess.run(
                [*tmux, "new-session", "-d", "-s", f"w{width}", "-x", str(width), "-y", "24",
                 *env, f"cd {shlex.quote(str(ROOT))} && unset COLUMNS LINES && {command}"],
                check=True,
            )  # fmt: skip

            def screen(width=width):
                shown = subprocess.run(
                    [*tmux, "capture-pane", "-p", "-t", f"w{width}"],
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
                try:
                    rows = _screen_rows(shown)
                except ValueError:
                    return None
                return (shown, rows) if set(rows) == set(names) else None

            shown, rows = wait_for(screen, 30, interval=0.2, what=f"the view at {width} columns")
            for name, row in rows.items():
                want = truth[name]
                assert row["state"] == "paused"
                assert row["step"] == str(want["step"]), (width, name, row, want)
                assert row["loss"] == f"{want['metrics']['loss']:.3g}", (width, name, row)
                assert row["lr"] == f"{want['lr']:.4g}", (width, name, row)
            assert rows["r1"]["lr"] == "0.0123"
            if width == 200:
                assert {"host", "device", "restarts", "age", "last change"} <= set(rows["r0"]), (
                    shown
                )
                assert rows["r1"]["last change"].startswith("lr 0.1 -> 0.0123 at step ")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


@pytest.mark.slow
def test_the_demo_runs_and_checks_itself():
    result = subprocess.run(
        [sys.executable, ROOT / "examples" / "demo.py"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo ok" in result.stdout


# -- the model, without processes ------------------------------------------------------------
