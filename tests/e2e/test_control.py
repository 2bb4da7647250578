"""The control plane, run for real: a nats-server, supervisors, workers, and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal

import pytest
from conftest import FAKE_NVML, SCRIPTS, run_loomrun, wait_for
from jobs import events, job_id, start, steering, wait_ready

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.broker.connect import answers, host_port
from loomrun.broker.state import state_dir
from loomrun.launch import free_port


def test_set_get_pause_resume_ls_through_the_cli(procs):
    job = job_id("cli")
    start(procs, SCRIPTS / "steered.py", "--steps", "100000", job=job, replicas=2)
    wait_ready(job, ("r0", "r1"))

    listed = json.loads(run_loomrun("ls", "--json").stdout)
    mine = [j for j in listed["jobs"] if j["job"] == job]
    assert mine and mine[0]["replicas"] == ["r0", "r1"] and mine[0]["state"] == "running"
    assert "steered.py --steps 100000" in mine[0]["script"]

    result = run_loomrun("set", "lr=0.05", "--replica", "r1", "--job", job)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("r1  lr 0.1 -> 0.05 at step ")

    got = json.loads(run_loomrun("get", "--job", job, "--json").stdout)
    values = {(p["replica"], p["name"]): p for p in got["params"]}
    assert values[("r0", "momentum")]["type"] == "a float"
    assert values[("r1", "lr")]["changed_at_step"] is not None
    assert values[("r0", "lr")]["changed_at_step"] is None

    paused = run_loomrun("pause", "--job", job, "--json")
    assert paused.returncode == 0, paused.stderr
    changes = json.loads(paused.stdout)["changes"]
    assert {c["replica"]: c["state"] for c in changes} == {"r0": "applied", "r1": "applied"}
    resumed = run_loomrun("resume", "--job", job)
    assert resumed.returncode == 0 and "r0  resumed at step" in resumed.stdout


def test_set_refuses_bad_requests_before_writing_anything(procs):
    job = job_id("refuse")
    start(procs, SCRIPTS / "steered.py", "--steps", "100000", job=job)
    wait_ready(job)
    cases = [
        (["set", "lrr=0.1", "--job", job], "r0 has no parameter 'lrr' (did you mean 'lr'?)"),
        (["set", "lr=fast", "--job", job], "invalid value for lr: expected a float"),
        (["set", "lr=-1", "--job", job], "-1.0 is below the minimum 0"),
        (["set", "lr=0.1", "--job", job, "--replica", "r9"], f"job {job} has no replica 'r9'"),
        (["set", "lr=0.1", "--job", "nojob"], "no job 'nojob' on this broker"),
        (["set", "lr", "--job", job], "'lr' is not KEY=VALUE"),
        (["set", "lr=0.1", "--replica", "one", "--job", job], "'one' is not a replica name"),
        (["set", "lr=0.1", "--replica", "", "--job", job], "no replica named"),
        (["set", "batch=99999999999999999999", "--job", job], "expected an integer of 64 bits"),
        (["set", "lr=0.1", "--at-step", "99999999999999999999", "--job", job], "not in the range"),
        (["set", "lr=0.1", "--timeout", "nan", "--job", job], "is not a finite number"),
    ]
    for args, message in cases:
        result = run_loomrun(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr

    async def desired_keys(s):
        return await s.entries(S.DESIRED, f"{job}.>")

    assert steering(desired_keys) == {}, "a refused set writes nothing"


def test_no_broker_is_one_line_and_exit_4():
    result = run_loomrun("set", "lr=0.1", "--nats", f"nats://127.0.0.1:{free_port()}")
    assert result.returncode == 4
    assert "cannot reach the NATS broker" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_job_is_required_when_several_run(procs):
    jobs = [job_id("many"), job_id("many")]
    for job in jobs:
        start(procs, SCRIPTS / "steered.py", "--steps", "100000", job=job)
    for job in jobs:
        wait_ready(job)
    result = run_loomrun("set", "lr=0.1")
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert "jobs are running" in result.stderr and all(j in result.stderr for j in jobs), said


def test_rejected_by_the_worker_and_timed_out_exit_codes(procs):
    job = job_id("codes")
    start(procs, SCRIPTS / "declared.py", job=job)
    wait_ready(job, name="explode")
    rejected = run_loomrun("set", "explode=true", "--job", job)
    assert rejected.returncode == 1
    assert (
        "rejected: explode handler raised RuntimeError: this handler always fails"
        in rejected.stdout
    )
    late = run_loomrun("set", "batch=8", "--job", job, "--at-step", "100000000", "--timeout", "1")
    assert late.returncode == 3
    assert "still desired" in late.stdout

    too_big = run_loomrun("set", "note=" + "x" * 20_000, "--job", job)
    assert too_big.returncode == 2, too_big.stdout + too_big.stderr
    assert (
        "invalid value for note: 20004 bytes as sent, over the 16 KiB a value may take"
        in too_big.stderr
    )


def _fuzz_messages(job: str, count: int):
    rng = random.Random(1234)
    subjects = [
        f"$KV.{S.DESIRED}.{job}.r0.param.lr",
        f"$KV.{S.DESIRED}.{job}.r0.param.momentum",
        f"$KV.{S.DESIRED}.{job}.r0.pause",
        f"$KV.{S.DESIRED}.{job}.r0.param.nope",
        f"$KV.{S.DESIRED}.{job}.r7.param.lr",
        f"$KV.{S.DESIRED}.{job}.garbage",
        S.DEVICE_FAILED,
        f"loomrun.{job}.events.r0",
    ]
    for _ in range(count):
        size = rng.choice([0, 1, 3, 17, 64, 500])
        yield rng.choice(subjects), bytes(rng.getrandbits(8) for _ in range(size))


def test_malformed_and_random_messages_do_not_stop_the_job(procs):
    job = job_id("fuzz")
    sup = start(procs, SCRIPTS / "steered.py", "--steps", "1000000", job=job)
    wait_ready(job)

    async def fuzz(s):
        for subject, data in _fuzz_messages(job, 500):
            await s.nc.publish(subject, data)
        await s.nc.flush()
        wrong = pb.DesiredParam()
        wrong.value.s = "not a number"
        await (await s.kv(S.DESIRED)).put(
            S.desired_param(job, "r0", "lr"), wrong.SerializeToString()
        )
        await asyncio.sleep(0.5)
        await s.pause(job, False, timeout=10)
        return await s.set(job, {"lr": 0.0123}, timeout=20)

    (result,) = steering(fuzz)
    assert result.state == "applied", result.as_dict()
    assert sup.poll() is None, "the supervisor must survive"


@pytest.mark.slow
def test_device_failure_stops_and_restarts_the_replica(procs):
    job = job_id("gpu")
    env = {"PYTHONPATH": f"{FAKE_NVML}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    sup = start(
        procs, SCRIPTS / "steered.py", "--steps", "100000", job=job, replicas=2, env=env,
        extra=("--max-restarts", "1", "--restart-policy", "replica"),
    )  # fmt: skip
    wait_ready(job, ("r0", "r1"))

    async def devices(s):
        found = await s.entries(S.DEVICES, ">")
        return {d.replica: d for d in map(pb.Device.FromString, found.values()) if d.job == job}

    registered = wait_for(lambda: len(d := steering(devices)) == 2 and d, 10, what="devices")
    assert registered["r1"].uuid == "GPU-fake0000-0000-0000-0000-000000000001"
    assert registered["r1"].name == "Fake GPU 80GB" and registered["r1"].memory == 80 * 2**30

    async def status(s):
        return (await s.statuses(job)).get("r0")

    telemetry = wait_for(lambda: (st := steering(status)) and st.gpu_util and st, 10, what="gpu")
    assert telemetry.gpu_util == 42 and telemetry.device_name == "Fake GPU 80GB"

    async def fail(s):
        failure = pb.DeviceFailure(uuid=registered["r1"].uuid, reason="XID 79")
        await s.nc.publish(S.DEVICE_FAILED, failure.SerializeToString())
        await s.nc.flush()

    steering(fail)
    wait_for(
        lambda: any(e.kind == "restarted" and e.replica == "r1" and "restart 1" in e.text
                    for e in events(job)),
        30,
        what="r1 to restart",
    )  # fmt: skip
    found = events(job)
    assert any(e.replica == "r1" and e.kind == "device_failed" for e in found)
    failed = [e for e in found if e.replica == "r1" and e.kind == "failed"]
    assert failed and "XID 79" in failed[0].text and failed[0].code == 143
    assert not any(e.replica == "r0" and e.kind in ("failed", "restarted") for e in found)
    wait_ready(job, ("r1",))
    assert sup.poll() is None
    sup.send_signal(signal.SIGTERM)
    _, err = sup.communicate(timeout=60)
    assert f"device {registered['r1'].uuid} failed: XID 79" in err
    assert "restarting r1 (restart 1/1)" in err


@pytest.mark.slow
def test_two_jobs_share_a_broker_and_the_last_to_end_stops_it(procs):
    url = f"nats://127.0.0.1:{free_port()}"
    env = {"LOOMRUN_NATS": url}
    first, second = job_id("first"), job_id("second")
    a = start(procs, SCRIPTS / "steered.py", "--steps", "1000000", job=first, env=env)
    wait_ready(first, url=url)
    b = start(procs, SCRIPTS / "steered.py", "--steps", "1000000", job=second, env=env)
    wait_ready(second, url=url)
    a.send_signal(signal.SIGTERM)
    _, a_err = a.communicate(timeout=60)
    assert "started the bundled NATS broker" in a_err
    assert answers(*host_port(url)), "the second job still uses it: it stays"
    result = run_loomrun("set", "lr=0.0321", "--job", second, "--nats", url, "--timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    watched = run_loomrun("watch", "--once", "--json", "--job", second, "--nats", url)
    assert watched.returncode == 0 and json.loads(watched.stdout)["jobs"][0]["job"] == second
    assert b.poll() is None
    b.send_signal(signal.SIGTERM)
    b.communicate(timeout=60)
    wait_for(lambda: not answers(*host_port(url)), 15, what="the broker to stop with its last job")


def test_a_second_run_of_a_running_job_id_is_refused_and_the_first_goes_on(procs):
    """It set the running job's ledger aside and purged its state on the broker."""
    job = job_id("twice")
    start(procs, SCRIPTS / "steered.py", "--steps", "10000000", "--quiet", job=job)
    wait_ready(job)
    assert run_loomrun("set", "lr=0.05", "--job", job).returncode == 0
    again = run_loomrun("--job", job, SCRIPTS / "steered.py", "--steps", "5", timeout=60)
    assert again.returncode == 2, again.stderr
    assert f"job {job} is already running on this host" in again.stderr
    assert len(again.stderr.splitlines()) == 1, again.stderr
    folder = state_dir() / "jobs" / job
    assert '"new": 0.05' in (folder / "changes.jsonl").read_text(), "not set aside"
    result = run_loomrun("set", "lr=0.07", "--job", job)
    assert result.returncode == 0 and "0.05 -> 0.07" in result.stdout, result.stderr


def test_a_token_protects_the_bundled_broker(procs):
    url = f"nats://127.0.0.1:{free_port()}"
    job = job_id("token")
    env = {"LOOMRUN_NATS": url, "LOOMRUN_NATS_TOKEN": "s3cret"}
    start(procs, SCRIPTS / "steered.py", "--steps", "1000000", job=job, env=env)
    wait_for(lambda: answers(*host_port(url)), 30, interval=0.2, what="the bundled broker")
    refused = run_loomrun("set", "lr=0.02", "--job", job, "--nats", url)
    assert refused.returncode == 4, refused.stderr
    assert "Traceback" not in refused.stderr

    def applied():
        result = run_loomrun("set", "lr=0.02", "--job", job, env=env)
        return result.returncode == 0 and "-> 0.02" in result.stdout

    wait_for(applied, 60, interval=0.5, what="a set with the token to apply")
