"""The launcher, run for real: environment, arguments, output, failures, signals, restarts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EXAMPLES, FAKE_NVML, SCRIPTS, pid_alive, run_loomrun, wait_for

from loomrun.broker.connect import answers
from loomrun.broker.state import HOST
from loomrun.launch import free_port
from loomrun.mailbox import SHM_DIR

# Keys whose values differ by design between two launches (ports, ids, temp paths), or that
# loomrun deliberately leaves out: it hosts no TCPStore, so USE_AGENT_STORE would hang
# init_process_group.
VARYING = {"MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE"}
NOT_SET_BY_LOOMRUN = {"TORCHELASTIC_USE_AGENT_STORE"}


def read_dumps(directory: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


@pytest.mark.slow
def test_worker_env_matches_torchrun_key_by_key(tmp_path):
    torchrun_dir, loomrun_dir = tmp_path / "torchrun", tmp_path / "loomrun"
    torchrun_dir.mkdir()
    loomrun_dir.mkdir()
    torchrun = Path(sys.executable).parent / "torchrun"
    script = SCRIPTS / "dump_env.py"
    subprocess.run(
        [torchrun, "--nproc-per-node", "2", script],
        env={**os.environ, "DUMP_DIR": str(torchrun_dir)},
        check=True,
        capture_output=True,
        timeout=120,
    )
    result = run_loomrun("--nproc-per-node", "2", script, env={"DUMP_DIR": str(loomrun_dir)})
    assert result.returncode == 0, result.stderr

    theirs, ours = read_dumps(torchrun_dir), read_dumps(loomrun_dir)
    assert sorted(theirs) == sorted(ours) == ["0", "1"]
    for rank in ("0", "1"):
        t_env, o_env = theirs[rank]["env"], ours[rank]["env"]
        set_by_torchrun = set(t_env) - set(os.environ) - {"DUMP_DIR"}
        for key in sorted(set_by_torchrun - NOT_SET_BY_LOOMRUN):
            assert key in o_env, f"loomrun does not set {key}"
            if key not in VARYING:
                assert o_env[key] == t_env[key], f"{key}: {t_env[key]!r} != {o_env[key]!r}"
        assert "TORCHELASTIC_USE_AGENT_STORE" not in o_env
        assert o_env["LOOMRUN_REPLICA"] == f"r{rank}"
        assert o_env["LOOMRUN_JOB"] == o_env["TORCHELASTIC_RUN_ID"]
        assert o_env["MASTER_PORT"].isdigit()
        assert ours[rank]["name"] == "__main__"


def test_the_brokers_token_never_reaches_a_worker(tmp_path):
    result = run_loomrun(
        "--no-broker", SCRIPTS / "dump_env.py",
        env={"DUMP_DIR": str(tmp_path), "LOOMRUN_NATS_TOKEN": "s3cret"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    env = read_dumps(tmp_path)["0"]["env"]
    assert "LOOMRUN_NATS_TOKEN" not in env and "s3cret" not in json.dumps(env)


def test_env_layout_across_nodes(tmp_path):
    result = run_loomrun(
        "--nnodes", "2", "--node-rank", "1", "--replicas", "2", "--job", "multi",
        SCRIPTS / "dump_env.py", env={"DUMP_DIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    dumps = read_dumps(tmp_path)
    assert sorted(dumps) == ["2", "3"]
    env = dumps["3"]["env"]
    assert env["LOOMRUN_REPLICA"] == "r3"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("3", "1", "4")
    assert (env["GROUP_RANK"], env["GROUP_WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("1", "2", "2")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29500")


@pytest.mark.parametrize(
    "args, replicas, script_argv",
    [
        (["{s}", "--replicas", "2"], 2, []),
        (["--nproc-per-node", "2", "{s}", "--epochs", "3"], 2, ["--epochs", "3"]),
        (["{s}", "--epochs", "3", "--replicas", "2", "pos"], 2, ["--epochs", "3", "pos"]),
        (["run", "{s}", "-x", "--", "--replicas", "5"], 1, ["-x", "--replicas", "5"]),
        (["--nproc_per_node=2", "{s}", "--lr=0.1"], 2, ["--lr=0.1"]),
    ],
)
def test_argument_rule(tmp_path, args, replicas, script_argv):
    script = str(SCRIPTS / "dump_env.py")
    argv = [a.replace("{s}", script) for a in args]
    result = run_loomrun(*argv, env={"DUMP_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    dumps = read_dumps(tmp_path)
    assert len(dumps) == replicas
    for dump in dumps.values():
        assert dump["argv"] == [script, *script_argv]
    taken = "--replicas" in args[args.index("{s}") :] and "--" not in args
    assert ("took --replicas after the script as loomrun's own" in result.stderr) == taken


@pytest.mark.parametrize(
    "value, gpus, workers",
    [("gpu", 3, 3), ("auto", 3, 3), ("auto", 0, len(os.sched_getaffinity(0))),
     ("cpu", 3, len(os.sched_getaffinity(0))), ("GPU", 1, 1)],
)  # fmt: skip
def test_nproc_per_node_counts_devices_as_torchrun_does(tmp_path, value, gpus, workers):
    env = {"DUMP_DIR": str(tmp_path), "FAKE_NVML_GPUS": str(gpus),
           "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus))) or "-1",
           "PYTHONPATH": f"{FAKE_NVML}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    result = run_loomrun("--no-broker", "--nproc-per-node", value, SCRIPTS / "dump_env.py", env=env)
    assert result.returncode == 0, result.stderr
    assert len(read_dumps(tmp_path)) == workers


def test_nproc_per_node_gpu_without_a_gpu_is_one_line(tmp_path):
    env = {"DUMP_DIR": str(tmp_path), "FAKE_NVML_GPUS": "0",
           "PYTHONPATH": f"{FAKE_NVML}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    result = run_loomrun("--nproc-per-node", "gpu", SCRIPTS / "dump_env.py", env=env)
    assert result.returncode == 2 and "gpu: NVML sees no GPU" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


def test_module_target(tmp_path):
    result = run_loomrun(
        "-m", "pkg.main", "--replicas", "2", "--", "--flag", "value",
        env={"DUMP_DIR": str(tmp_path)}, cwd=SCRIPTS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    dumps = read_dumps(tmp_path)
    assert len(dumps) == 2
    for dump in dumps.values():
        assert dump["name"] == "__main__"
        assert dump["argv"][0].endswith(os.path.join("pkg", "main.py"))
        assert dump["argv"][1:] == ["--flag", "value"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.py"], "'missing.py' does not exist"),
        (["--bogus", "{s}"], "no such option: --bogus"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    """The exit path of a usage error in a real process (every case: tests/unit/test_cli.py)."""
    script = str(SCRIPTS / "dump_env.py")
    argv = ["run", *(a.replace("{s}", script) for a in args)]
    result = run_loomrun(*argv, env={"DUMP_DIR": str(tmp_path)}, cwd=SCRIPTS)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir()), "nothing may start on a usage error"


def test_worker_lines_are_prefixed_whole_and_in_order(tmp_path):
    result = run_loomrun("--replicas", "2", SCRIPTS / "chatter.py")
    assert result.returncode == 0, result.stderr
    for stream, tag in ((result.stdout, "out"), (result.stderr, "err")):
        seen = {"0": [], "1": []}
        for line in stream.splitlines():
            if line.startswith("loomrun:"):
                continue
            fill = ("x" if tag == "out" else "y") * 100
            m = re.fullmatch(rf"\[r(\d)\] {tag} (\d) (\d+) {fill}", line)
            assert m, f"torn or unprefixed line: {line[:80]!r}"
            assert m.group(1) == m.group(2)
            seen[m.group(1)].append(int(m.group(3)))
        assert seen == {"0": list(range(2000)), "1": list(range(2000))}


def test_log_dir_and_console_filter(tmp_path):
    result = run_loomrun(
        "--replicas", "2", "--log-dir", tmp_path, "--replicas-filter", "r1", "--job", "logs",
        SCRIPTS / "chatter.py",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "[r0]" not in result.stdout and "[r1] out 1 0 " in result.stdout
    r0 = tmp_path / "logs" / "attempt_0" / "r0"
    assert (r0 / "stdout.log").read_text().splitlines()[0].startswith("out 0 0 ")
    assert len((r0 / "stderr.log").read_text().splitlines()) == 2000


def test_failure_exits_with_the_workers_code_and_a_summary():
    started = time.monotonic()
    result = run_loomrun("--replicas", "2", SCRIPTS / "exit_with.py", "3", env={"FAIL_RANK": "1"})
    assert result.returncode == 3
    assert "replica r1 failed: exit code 3" in result.stderr
    assert "pid" in result.stderr
    assert time.monotonic() - started < 30, "the other replica must be stopped, not awaited"


def test_traceback_of_the_failed_replica_is_in_the_summary():
    result = run_loomrun("--replicas", "2", SCRIPTS / "exit_with.py", "raise")
    assert result.returncode == 1
    summary = result.stderr[result.stderr.index("replica r0 failed") :]
    assert "RuntimeError: the model diverged at step 7" in summary
    assert "exit_with.py" in summary
    assert "runpy" not in result.stderr and "boot.py" not in result.stderr


def test_worker_killed_by_signal_gives_128_plus_n():
    result = run_loomrun("--replicas", "2", SCRIPTS / "exit_with.py", "kill")
    assert result.returncode == 137
    assert "killed by SIGKILL" in result.stderr


JOB = f"sleepers-{os.getpid()}"


def _start_sleepers(procs, tmp_path, replicas=2, grace="30"):
    sup = procs.start(
        "--replicas", str(replicas), "--grace", grace, "--job", JOB,
        SCRIPTS / "sleep_with_child.py",
        env={"DUMP_DIR": str(tmp_path)},
    )  # fmt: skip

    files = wait_for(lambda: _pid_files(tmp_path, replicas), timeout=30, what="workers to start")
    return sup, [int(p) for f in files for p in f.read_text().split()]


def test_sigint_reaches_every_worker_and_their_children(procs, tmp_path):
    sup, pids = _start_sleepers(procs, tmp_path)
    assert all(pid_alive(p) for p in pids)
    sup.send_signal(signal.SIGINT)
    assert sup.wait(30) == 130
    wait_for(lambda: not any(pid_alive(p) for p in pids), 5, what="workers to be gone")


def test_grace_period_ends_in_sigkill(procs, tmp_path):
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open(os.path.join(os.environ['DUMP_DIR'], os.environ['RANK'] + '.pids'), 'w')"
        ".write(str(os.getpid()))\n"
        "time.sleep(600)\n"
    )
    sup = procs.start("--grace", "1", script, env={"DUMP_DIR": str(tmp_path)})
    pid_file = wait_for(
        lambda: (f := next(tmp_path.glob("*.pids"), None)) and f.read_text() and f, 30,
        what="worker",
    )  # fmt: skip
    pid = int(pid_file.read_text())
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(20) == 143
    assert "sending SIGKILL" in sup.stderr.read()
    assert not pid_alive(pid)


@pytest.mark.slow
def test_sigkilled_supervisor_leaves_nothing_behind(procs, tmp_path):
    """Workers, the processes they started, the segments, and the broker only it used."""
    port = free_port()
    state = tmp_path / "state"
    env = {"LOOMRUN_NATS": f"nats://127.0.0.1:{port}", "XDG_STATE_HOME": str(state)}
    sup = procs.start(
        "--replicas", "2", "--job", JOB, SCRIPTS / "sleep_with_child.py",
        env={"DUMP_DIR": str(tmp_path), **env},
    )  # fmt: skip
    files = wait_for(lambda: _pid_files(tmp_path, 2), 30, what="workers to start")
    pids = [int(p) for f in files for p in f.read_text().split()]
    record = state / "loomrun" / f"broker-{HOST}-{port}.pid"
    wait_for(lambda: answers("127.0.0.1", port) and record.exists(), 30, what="its broker")
    broker_pid = int(record.read_text())
    segments = set(SHM_DIR.glob(f"loomrun-{os.getuid()}-{JOB}-r*"))
    assert len(segments) == 2
    sup.kill()
    sup.wait(10)
    gone = [*pids, broker_pid]
    wait_for(lambda: not any(pid_alive(p) for p in gone), 2.0, what="every process to go")
    wait_for(lambda: not any(p.exists() for p in segments), 2.0, what="the segments to go")


def test_sighup_stops_the_job_like_sigterm(procs, tmp_path):
    sup, pids = _start_sleepers(procs, tmp_path)
    sup.send_signal(signal.SIGHUP)
    assert sup.wait(30) == 129
    assert "got SIGHUP: passing SIGTERM to 2 worker(s)" in sup.stderr.read()
    wait_for(lambda: not any(pid_alive(p) for p in pids), 5, what="workers to be gone")


def _pid_files(folder, count: int):
    files = sorted(folder.glob("*.pids"))
    whole = len(files) == count and all(f.read_text().endswith("\n") for f in files)
    return whole and files


def test_max_restarts_restarts_the_group_and_counts():
    result = run_loomrun(
        "--replicas", "2", "--max-restarts", "2", SCRIPTS / "restart_count.py",
        env={"SUCCEED_AT": "2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "restarting all replicas (restart 1/2)" in result.stderr
    assert "restarting all replicas (restart 2/2)" in result.stderr
    assert "[r0] restart count 2" in result.stdout
    assert "[r1] restart count 2" in result.stdout


def test_restarts_run_out():
    result = run_loomrun(
        "--max-restarts", "1", SCRIPTS / "restart_count.py", env={"SUCCEED_AT": "5"}
    )
    assert result.returncode == 5
    assert "restart 1/1" in result.stderr
    assert "replica r0 failed: exit code 5" in result.stderr


def test_replica_restart_policy_restarts_only_the_failed_one(tmp_path):
    script = tmp_path / "one_fails.py"
    script.write_text(
        "import os, sys\n"
        "count = int(os.environ['TORCHELASTIC_RESTART_COUNT'])\n"
        "print('run', os.environ['LOOMRUN_REPLICA'], count, flush=True)\n"
        "if os.environ['RANK'] == '1' and count == 0:\n"
        "    sys.exit(4)\n"
    )
    result = run_loomrun(
        "--replicas", "2", "--max-restarts", "1", "--restart-policy", "replica", script
    )
    assert result.returncode == 0, result.stderr
    assert "restarting r1 (restart 1/1): r1 exit code 4" in result.stderr
    assert result.stdout.count("run r0") == 1
    assert "run r1 1" in result.stdout


@pytest.mark.slow
def test_ddp_example_trains_under_loomrun(tmp_path):
    result = run_loomrun(
        "--replicas", "2", EXAMPLES / "ddp_train.py", "--steps", "30", "--print-every", "10",
        "--save", tmp_path / "model",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "[r0] step    30" in result.stdout
    assert "world 2" in result.stdout
    assert (tmp_path / "model.rank0.pt").exists() and (tmp_path / "model.rank1.pt").exists()


def test_the_supervisor_side_never_imports_torch():
    code = (
        "import sys; import loomrun.cli.run, loomrun.cli.steer, loomrun.cli.inspecting, "
        "loomrun.cli.log, loomrun.cli.serve, loomrun.launch, loomrun.supervisor, "
        "loomrun.control, loomrun.client, loomrun.watch; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


LIFELINE_CHILD = (
    "import os, time; from loomrun.lifeline import PARENT_PID, end_with_parent; "
    "end_with_parent(); print('asked', os.environ.get(PARENT_PID), flush=True); time.sleep(60)"
)


def test_a_child_asks_to_end_with_its_parent_and_does():
    """Workers ask for the parent-death signal themselves (so the supervisor can vfork
    them): a SIGKILLed parent takes its child along, watchdog or not."""
    parent = subprocess.Popen(
        [
            sys.executable, "-c",
            "import os, subprocess, sys, time; from loomrun.lifeline import parent_env; "
            f"child = subprocess.Popen([sys.executable, '-c', {LIFELINE_CHILD!r}], "
            "env={**os.environ, **parent_env()}); "
            "print(child.pid, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        child = int(parent.stdout.readline())
        assert parent.stdout.readline().split() == ["asked", "None"], "not passed on further"
        parent.kill()
        parent.wait(10)
        wait_for(lambda: not pid_alive(child), 5, what="the child to end with its parent")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)  # the child is in its group
        parent.communicate(timeout=10)


def test_a_child_whose_parent_already_died_leaves_at_once():
    done = subprocess.run(
        [sys.executable, "-c", LIFELINE_CHILD],
        env={**os.environ, "LOOMRUN_PARENT_PID": "1"},  # not its parent: died, reparented
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "asked" not in done.stdout


def test_workers_end_with_the_supervisor_by_the_kernel_too(tmp_path):
    """Besides the watchdog, each worker holds the parent-death signal (SIGKILL), which it
    asked for itself at boot, and hands the request on to no process it starts."""
    script = tmp_path / "death_signal.py"
    script.write_text(
        "import ctypes, os\n"
        "held = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(held))  # PR_GET_PDEATHSIG\n"
        "print('death signal', held.value, os.environ.get('LOOMRUN_PARENT_PID'))\n"
    )
    result = run_loomrun("--no-broker", "--replicas", "2", script)
    assert result.returncode == 0, result.stderr
    assert f"[r0] death signal {int(signal.SIGKILL)} None" in result.stdout, result.stdout
    assert f"[r1] death signal {int(signal.SIGKILL)} None" in result.stdout, result.stdout
