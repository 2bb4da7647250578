"""The worker side, run for real: live changes through the mailbox into a training loop.

These jobs run with --no-broker, so the test is the mailbox's one desired-state writer, as
the supervisor's control plane is otherwise; the same paths with the broker, the CLI and
`Steering` are in test_control.py and test_steering.py.
"""

from __future__ import annotations

import math
import re
import secrets
import subprocess

import pytest
from conftest import EXAMPLES, LOOMRUN, SCRIPTS, wait_for
from steering import Steer, stays_still

from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb


def job_id(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def start(procs, script, *args, job, replicas=1, extra=()):
    return procs.start("--no-broker", "--replicas", replicas, "--job", job, *extra, script, *args)


@pytest.fixture
def steer_of():
    opened = []

    def steer(job, replica="r0"):
        s = Steer(job, replica)
        opened.append(s)
        return s

    yield steer
    for s in opened:
        s.close()


def used_lrs(stdout: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"used (\d+) (\S+)", stdout)}


def test_live_lr_change_applies_at_the_next_step(procs, steer_of):
    job = job_id("train")
    sup = start(procs, EXAMPLES / "train.py", "--steps", "100000", "--step-time", "0.002", job=job)
    steer = steer_of(job)
    steer.wait_step(20)
    assert steer.value("lr") == pytest.approx(0.01)
    version = steer.set("lr", 0.002)
    outcome = steer.outcome("lr", version)
    assert outcome.state == pb.APPLIED and not outcome.reason
    assert P.from_pb(outcome.old) == pytest.approx(0.01)
    assert P.from_pb(outcome.new) == pytest.approx(0.002)
    assert outcome.step >= 20
    wait_for(lambda: steer.value("lr") == pytest.approx(0.002), 5, what="status to show lr")
    assert steer.status().metrics["loss"] > 0
    assert steer.status().steps_per_sec > 0
    assert sup.poll() is None


def test_builtin_schema_follows_the_optimizer(procs, steer_of):
    job = job_id("adam")
    start(procs, SCRIPTS / "steered.py", "--optimizer", "adam", "--steps", "100000", job=job)
    steer = steer_of(job)
    steer.wait_step(5)
    schema = steer.schema()
    assert {"lr", "weight_decay", "betas"} <= set(schema)
    assert "momentum" not in schema
    assert schema["betas"].is_list and schema["betas"].length == 2
    version = steer.set("betas", [0.8, 0.99])
    assert steer.outcome("betas", version).state == pb.APPLIED
    assert steer.value("betas") == pytest.approx([0.8, 0.99])


@pytest.mark.parametrize(
    "value, reason",
    [
        ("fast", "invalid value for lr: expected a float, got 'fast'"),
        (-1.0, "invalid value for lr: -1.0 is below the minimum 0"),
    ],
)
def test_rejected_value_leaves_the_old_one_and_says_why(procs, steer_of, value, reason):
    job = job_id("reject")
    sup = start(procs, SCRIPTS / "steered.py", "--steps", "100000", job=job)
    steer = steer_of(job)
    steer.wait_step(5)
    version = steer.set("lr", value)
    outcome = steer.outcome("lr", version)
    assert outcome.state == pb.REJECTED
    assert outcome.reason == reason
    assert steer.value("lr") == pytest.approx(0.1)
    before = steer.status().step
    steer.wait_step(before + 5)
    assert sup.poll() is None


def test_unknown_parameter_is_rejected_with_what_exists(procs, steer_of):
    job = job_id("unknown")
    start(procs, SCRIPTS / "steered.py", "--steps", "100000", job=job)
    steer = steer_of(job)
    steer.wait_step(5)
    outcome = steer.outcome("lrr", steer.set("lrr", 0.1))
    assert outcome.state == pb.REJECTED
    assert "unknown parameter 'lrr'" in outcome.reason and "lr" in outcome.reason


def test_pause_stops_the_step_counter_and_resume_continues(procs, steer_of):
    job = job_id("pause")
    start(procs, SCRIPTS / "steered.py", "--steps", "100000", job=job)
    steer = steer_of(job)
    steer.wait_step(5)
    paused = steer.outcome("pause", steer.pause(True))
    assert paused.state == pb.APPLIED and P.from_pb(paused.new) is True
    assert steer.status().paused
    assert stays_still(steer)
    assert steer.status().step == paused.step
    resumed = steer.outcome("pause", steer.pause(False))
    assert P.from_pb(resumed.new) is False
    steer.wait_step(paused.step + 10)
    assert not steer.status().paused


@pytest.mark.parametrize("scheduler", ["step", "lambda"])
def test_lr_change_survives_the_scheduler(procs, steer_of, scheduler):
    job = job_id("sched")
    sup = start(procs, SCRIPTS / "steered.py", "--scheduler", scheduler, "--steps", "160", job=job)
    steer = steer_of(job)
    steer.wait_step(10)
    outcome = steer.outcome("lr", steer.set("lr", 0.02))
    assert outcome.state == pb.APPLIED
    out, err = sup.communicate(timeout=60)
    assert sup.returncode == 0, err
    used = used_lrs(out)
    n = outcome.step
    assert n < 50, "the change must land before the first StepLR decay for this test"
    assert used[n] == pytest.approx(0.02)
    assert used[n - 1] != pytest.approx(0.02)
    if scheduler == "step":
        assert used[49] == pytest.approx(0.02)
        assert used[51] == pytest.approx(0.01)
        assert used[101] == pytest.approx(0.005)
    else:
        f = lambda s: 1.0 / (1.0 + 0.01 * s)  # noqa: E731
        for later in (n + 10, 150):
            assert used[later] == pytest.approx(0.02 * f(later - 1) / f(n - 1), rel=1e-6)


def test_at_step_applies_exactly_there(procs, steer_of):
    job = job_id("atstep")
    sup = start(procs, SCRIPTS / "steered.py", "--steps", "200", job=job)
    steer = steer_of(job)
    steer.wait_step(5)
    target = steer.status().step + 60
    outcome = steer.outcome("lr", steer.set("lr", 0.05, at_step=target))
    assert outcome.step == target and outcome.state == pb.APPLIED
    out, _ = sup.communicate(timeout=60)
    used = used_lrs(out)
    assert used[target - 1] == pytest.approx(0.1) and used[target] == pytest.approx(0.05)


def test_restarted_worker_gets_the_desired_config_before_its_first_step(procs, steer_of):
    job = job_id("restart")
    sup = start(
        procs, SCRIPTS / "steered.py", "--steps", "30", "--crash-at-step", "25",
        "--step-time", "0.02", job=job, extra=("--max-restarts", "1"),
    )  # fmt: skip
    steer = steer_of(job)
    steer.wait_step(2)
    assert steer.outcome("lr", steer.set("lr", 0.5)).state == pb.APPLIED
    out, err = sup.communicate(timeout=60)
    assert sup.returncode == 0, err
    assert "restarting all replicas" in err
    second_run = out[out.rindex("used 1 ") :]
    assert used_lrs(second_run)[1] == pytest.approx(0.5)


def test_declared_params_and_handlers(procs, steer_of):
    job = job_id("declared")
    sup = start(procs, SCRIPTS / "declared.py", job=job)
    steer = steer_of(job)
    steer.wait_step(5)
    schema = steer.schema()
    assert schema["batch"].kind == "int" and schema["batch"].max == 4096
    assert schema["batch"].doc == "examples per step" and schema["batch"].default == 32
    assert schema["mode"].choices == ("FAST", "CAREFUL")
    assert schema["temperature"].doc == "sampling temperature"
    assert schema["dropout"].choices == ("low", "high")
    assert "lr" not in schema

    assert steer.outcome("batch", steer.set("batch", 64)).state == pb.APPLIED
    assert steer.outcome("mode", steer.set("mode", "CAREFUL")).state == pb.APPLIED
    assert steer.outcome("temperature", steer.set("temperature", 0.5)).state == pb.APPLIED
    dropout = steer.outcome("dropout", steer.set("dropout", "high"))
    assert dropout.state == pb.APPLIED and P.from_pb(dropout.old) == "low"
    failed = steer.outcome("explode", steer.set("explode", True))
    assert failed.state == pb.REJECTED
    assert failed.reason == "explode handler raised RuntimeError: this handler always fails"
    bad = steer.outcome("batch", steer.set("batch", 0))
    assert bad.reason == "invalid value for batch: 0 is below the minimum 1"

    wait_for(lambda: steer.value("batch") == 64, 5, what="batch in status")
    status = steer.status()
    assert math.isclose(status.metrics["loss"], 1.0 / status.step, rel_tol=0.5)
    steer.wait_step(status.step + 25)
    assert sup.poll() is None
    sup.terminate()
    out = sup.communicate(timeout=30)[0]
    assert sup.returncode == 143
    assert "temperature -> 0.5" in out and "dropout -> high" in out
    assert re.search(r"batch 64 mode CAREFUL", out)


def test_script_runs_under_plain_python_with_the_api_as_no_ops(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, EXAMPLES / "train.py", "--steps", "20", "--print-every", "10"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "step    20" in result.stdout


def test_malformed_desired_state_is_one_line_and_training_goes_on(procs, steer_of):
    job = job_id("garbage")
    sup = start(procs, SCRIPTS / "steered.py", "--steps", "100000", job=job)
    steer = steer_of(job)
    steer.wait_step(5)
    slot = steer.box.desired
    seq = slot.seq[0]
    slot.seq[0] = seq + 1
    slot._length[0] = 7
    slot._payload[:7] = b"\x0a\xff\xff\xff\xff\xff\xff"
    slot.seq[0] = seq + 2
    before = steer.status().step
    steer.wait_step(before + 20)
    outcome = steer.outcome("lr", steer.set("lr", 0.03))
    assert outcome.state == pb.APPLIED
    sup.terminate()
    _, err = sup.communicate(timeout=30)
    assert "[r0] loomrun: the desired slot holds a malformed message" in err
    assert "Traceback" not in err


def test_a_script_without_torch_never_imports_it():
    result = subprocess.run(
        [*LOOMRUN, "--no-broker", SCRIPTS / "no_torch.py"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "[r0] torch imported: False" in result.stdout


def test_ranks_told_different_agreement_periods_settle_on_one_and_say_so(tmp_path):
    """A rank told LOOMRUN_AGREE_EVERY and one not would meet at different steps and hang:
    the ranks compare what places their points when they join, and all take one."""
    script = tmp_path / "told_apart.py"
    script.write_text(
        "import os\n"
        "import torch, torch.distributed as dist\n"
        "if os.environ['RANK'] == '0':\n"
        "    os.environ['LOOMRUN_AGREE_EVERY'] = '4'\n"
        "dist.init_process_group('gloo')\n"
        "model = torch.nn.Linear(2, 1)\n"
        "optimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "for _ in range(40):\n"
        "    optimizer.zero_grad()\n"
        "    model(torch.ones(1, 2)).sum().backward()\n"
        "    optimizer.step()\n"
        "dist.destroy_process_group()\n"
        "print('done', flush=True)\n"
    )
    result = subprocess.run(
        [*LOOMRUN, "--no-broker", "--replicas", "2", script],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    said = "different LOOMRUN_AGREE_EVERY (from unset to 4); they all agree every 4 steps"
    assert result.stderr.count(said) == 1, result.stderr  # rank 0 says it for all
    assert "[r0] done" in result.stdout and "[r1] done" in result.stdout
