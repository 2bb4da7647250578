"""Steering you can trust, run for real: each answer is its own change's, ranks never
diverge, restarts keep every change, versions survive a new broker store."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess

import pytest
import torch
from conftest import EXAMPLES, LOOMRUN, SCRIPTS, run_loomrun, wait_for
from jobs import job_id, start, steps_seen, wait_ready

from loomrun.broker.bundled import BundledBroker
from loomrun.broker.config import default_store
from loomrun.broker.connect import answers, host_port
from loomrun.broker.state import state_dir
from loomrun.launch import free_port


def set_json(*args, **kwargs) -> tuple[int, dict]:
    result = run_loomrun("set", *args, "--json", **kwargs)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout) if result.stdout else {}


def by_replica(answer: dict) -> dict[str, dict]:
    return {c["replica"]: c for c in answer["changes"]}


def test_the_same_key_set_twice_gets_its_own_answer(procs):
    job = job_id("twice")
    start(procs, SCRIPTS / "steered.py", "--steps", "1000000", job=job, replicas=2)
    wait_ready(job, ("r0", "r1"))
    code, first = set_json("lr=0.05", "--replica", "r1", "--job", job)
    assert code == 0, first
    code, second = set_json("lr=0.05", "--replica", "r1", "--job", job)
    assert code == 0, second
    one, two = by_replica(first)["r1"], by_replica(second)["r1"]
    assert one["change_id"] != two["change_id"]
    assert one["old"] == 0.1 and two["old"] == 0.05, "the second answer is the second change's"
    assert two["step"] > one["step"], (one, two)
    code, third = set_json("lr=0.07", "--replica", "r1", "--job", job)
    assert code == 0 and by_replica(third)["r1"]["old"] == 0.05
    assert by_replica(third)["r1"]["new"] == 0.07

    # The command itself, whole, does not load JetStream's client (a sixth of its time).
    args = ["set", "lr=0.08", "--replica", "r1", "--job", job, "--json"]
    program = (
        "import atexit, sys; from loomrun.cli import main; "
        "atexit.register(lambda: print('nats.js.api' in sys.modules, file=sys.stderr)); "
        f"sys.argv = ['loomrun', *{args!r}]; main()"
    )
    done = subprocess.run([LOOMRUN[0], "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and by_replica(json.loads(done.stdout))["r1"]["old"] == 0.07
    assert done.stderr.split() == ["False"], done.stderr

    steps = []
    for command, paused in (("pause", True), ("resume", False), ("pause", True)):
        result = run_loomrun(command, "--job", job, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        answers_ = by_replica(json.loads(result.stdout))
        assert {c["new"] for c in answers_.values()} == {paused}, (command, answers_)
        assert {c["old"] for c in answers_.values()} == {not paused}, (command, answers_)
        steps.append(answers_["r0"]["step"])
    assert steps[0] <= steps[1] <= steps[2]
    assert steps[2] > steps[1], "resumed replicas stepped before the second pause"


def test_an_old_rejection_never_answers_a_later_change(procs):
    job = job_id("rejection")
    start(procs, SCRIPTS / "declared.py", job=job)
    wait_ready(job, name="batch_size")
    code, rejected = set_json("batch_size=-4", "--job", job)
    assert code == 1 and rejected["result"] == "rejected", rejected
    assert "batch_size must be positive, not -4" in rejected["changes"][0]["reason"]
    code, later = set_json("batch_size=64", "temperature=0.2", "--job", job)
    assert code == 0, later
    [answer] = later["changes"]  # one set of two keys: one change, one answer
    assert answer["state"] == "applied"
    assert [(p["name"], p["new"]) for p in answer["parts"]] == [
        ("batch_size", 64),
        ("temperature", 0.2),
    ]
    code, again = set_json("batch_size=-5", "--job", job)
    assert code == 1 and "not -5" in again["changes"][0]["reason"], again


def test_independent_replicas_apply_at_once(procs):
    job = job_id("independent")
    start(
        procs, SCRIPTS / "steered.py", "--steps", "1000000", "--step-time", "0.004",
        "--slow-rank", "1", job=job, replicas=2,
    )  # fmt: skip
    wait_ready(job, ("r0", "r1"))
    wait_for(lambda: steps_seen(job) > 200, 60, what="r0 well ahead of r1")
    code, answer = set_json("lr=0.002", "--job", job)
    assert code == 0, answer
    steps = {c["replica"]: c["step"] for c in answer["changes"]}
    assert {c["state"] for c in answer["changes"]} == {"applied"}
    assert steps["r0"] > steps["r1"] + 100, f"each at its own next step, no common one: {steps}"


def _used(stdout: str, rank_prefix: str = "") -> dict[int, list[float]]:
    pattern = rf"{re.escape(rank_prefix)}used (\d+) ([0-9.e-]+(?: [0-9.e-]+)*) batch (\d+)"
    return {int(m[1]): [float(x) for x in m[2].split()] + [int(m[3])]
            for m in re.finditer(pattern, stdout)}  # fmt: skip


def test_lr_keeps_the_param_groups_ratio_and_lr_n_sets_one_group(procs):
    job = job_id("groups")
    sup = start(procs, SCRIPTS / "steered.py", "--groups", "2", "--steps", "1000000", job=job)
    wait_ready(job)
    got = json.loads(run_loomrun("get", "--job", job, "--json").stdout)
    names = {p["name"]: p for p in got["params"]}
    assert {"lr", "lr.0", "lr.1"} <= set(names)
    assert names["lr.1"]["value"] == 0.01 and "keep their ratio" in names["lr"]["doc"]
    code, answer = set_json("lr=0.2", "--job", job)
    assert code == 0, answer
    step = answer["changes"][0]["step"]
    code, answer = set_json("lr.1=0.05", "--job", job)
    assert code == 0, answer
    step_one = answer["changes"][0]["step"]
    wait_for(lambda: (s := steps_seen(job)) and s > step_one + 2, 30, what="more steps")
    sup.send_signal(signal.SIGTERM)
    out, _ = sup.communicate(timeout=60)
    used = _used(out)
    assert used[step - 1][:2] == [0.1, 0.01]
    assert used[step][:2] == pytest.approx([0.2, 0.02]), "the ratio of the groups is kept"
    assert used[step_one][:2] == pytest.approx([0.2, 0.05])


@pytest.mark.slow
def test_a_restart_starts_with_every_change_and_no_past_at_step(procs):
    job = job_id("restart")
    sup = start(
        procs, SCRIPTS / "steered.py", "--steps", "120", "--crash-at-step", "100",
        "--step-time", "0.02", job=job, extra=("--max-restarts", "1"),
    )  # fmt: skip
    wait_ready(job, name="batch")
    at = steps_seen(job) + 25
    code, answer = set_json("lr=0.5", "batch=16", "--at-step", str(at), "--job", job)
    assert code == 0, answer
    assert {c["step"] for c in answer["changes"]} == {at}
    out, err = sup.communicate(timeout=120)
    assert sup.returncode == 0, err
    assert "restarting all replicas" in err
    second_run = _used(out[out.rindex("used 1 ") :])
    assert second_run[1] == [0.5, 16], "the restarted worker has both changes from step 1"
    # It answered for them again (applied): not a second record in the ledger, on disk
    # or in the broker (`log` reads the broker's).
    on_disk = (state_dir() / "jobs" / job / "changes.jsonl").read_text().splitlines()
    read = run_loomrun("log", "--job", job, "--json")
    for lines in (on_disk, read.stdout.splitlines()):
        records = [json.loads(line) for line in lines]
        assert [(r["name"], r["outcome"]) for r in records] == [("batch", "applied")], records
        assert [p["name"] for p in records[0]["parts"]] == ["batch", "lr"], "one change"


@pytest.mark.slow
def test_ddp_ranks_agree_refuse_part_of_the_group_and_miss_together(procs):
    job = job_id("ddp")
    sup = start(
        procs, EXAMPLES / "ddp_train.py", "--steps", "100000", "--step-time", "0.005",
        job=job, replicas=2,
    )  # fmt: skip
    wait_ready(job, ("r0", "r1"))
    for command in (["set", "lr=0.2"], ["pause"], ["resume"]):
        refused = run_loomrun(*command, "--replica", "r1", "--job", job)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "r1 trains in one process group of 2 ranks with r0" in refused.stderr
        assert len([line for line in refused.stderr.splitlines() if "Error" in line]) == 1

    code, answer = set_json("lr=0.004", "momentum=0.8", "--job", job)
    assert code == 0, answer
    assert len({c["step"] for c in answer["changes"]}) == 1, "all ranks, all keys, one step"

    paused = json.loads(run_loomrun("pause", "--job", job, "--json").stdout)
    assert {c["state"] for c in paused["changes"]} == {"applied"}
    assert len({c["step"] for c in paused["changes"]}) == 1, "ranks pause at one step"
    assert run_loomrun("resume", "--job", job).returncode == 0
    code, missed = set_json("lr=0.009", "--at-step", "1", "--job", job)
    assert code == 1 and missed["result"] == "missed", missed
    assert {c["state"] for c in missed["changes"]} == {"missed"}
    assert "no rank applied it" in missed["changes"][0]["reason"]
    got = json.loads(run_loomrun("get", "--job", job, "--json").stdout)
    lrs = {p["replica"]: p["value"] for p in got["params"] if p["name"] == "lr"}
    assert lrs == {"r0": 0.004, "r1": 0.004}, "a missed change is applied nowhere"

    code, forced = set_json("lr=0.02", "--replica", "r1", "--force", "--job", job)
    assert code == 0 and forced["changes"][0]["replica"] == "r1", forced
    code, answer = set_json("lr=0.003", "--job", job)
    assert code == 0, answer
    sup.send_signal(signal.SIGINT)
    sup.communicate(timeout=120)


@pytest.mark.slow
def test_ddp_change_under_load_keeps_ranks_bitwise_identical(procs, tmp_path):
    job = job_id("bitwise")
    sup = start(
        procs, EXAMPLES / "ddp_train.py", "--steps", "1500", "--step-time", "0.004",
        "--save", tmp_path / "model", job=job, replicas=2,
    )  # fmt: skip
    wait_ready(job, ("r0", "r1"))
    for value in ("0.003", "0.004", "0.005"):  # one after the other, as fast as they go
        code, answer = set_json(f"lr={value}", "momentum=0.85", "--job", job)
        assert code == 0, answer
        assert len({c["step"] for c in answer["changes"]}) == 1, answer
    out, err = sup.communicate(timeout=180)
    assert sup.returncode == 0, err
    assert "lr 0.005" in out, "the last change is in effect at the end"
    rank0 = torch.load(tmp_path / "model.rank0.pt")
    rank1 = torch.load(tmp_path / "model.rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"


@pytest.mark.slow
def test_a_new_broker_store_does_not_make_new_changes_look_old(procs):
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    broker = BundledBroker.start(port)
    env = {"LOOMRUN_NATS": url}
    try:
        job = job_id("newstore")
        start(procs, SCRIPTS / "steered.py", "--steps", "1000000", job=job, env=env)
        wait_ready(job, url=url)
        for value in ("0.02", "0.03", "0.04"):  # revisions well past what a new store has
            assert run_loomrun("set", f"lr={value}", "--job", job, env=env).returncode == 0
        broker.stop()
        shutil.rmtree(default_store(port))  # whoever starts it again starts it empty
        wait_for(lambda: answers(*host_port(url)), 15, interval=0.2, what="a broker again")

        said = []

        def applied():
            result = run_loomrun("set", "lr=0.0123", "--job", job, "--timeout", "10", env=env)
            said.append(result.stdout + result.stderr)
            return result.returncode == 0 and "0.04 -> 0.0123" in result.stdout

        try:
            wait_for(applied, 60, interval=0.5, what="a change on the new store to apply")
        except AssertionError:
            raise AssertionError(f"{said[-3:]}") from None
    finally:
        broker.stop()


def test_a_finished_job_shows_where_it_really_ended(procs):
    job = job_id("final")
    sup = start(procs, SCRIPTS / "steered.py", "--steps", "300", "--step-time", "0", job=job)
    out, err = sup.communicate(timeout=120)
    assert sup.returncode == 0, err
    snap = json.loads(run_loomrun("watch", "--once", "--json", "--job", job).stdout)
    (row,) = snap["jobs"][0]["replicas"]
    assert row["step"] == 300 and row["state"] == "exited 0", row


@pytest.mark.slow
def test_ddp_a_later_change_supersedes_one_agreed_for_a_later_step(procs):
    job = job_id("scheduled")
    start(
        procs, EXAMPLES / "ddp_train.py", "--steps", "1000000", "--step-time", "0.004",
        job=job, replicas=2,
    )  # fmt: skip
    wait_ready(job, ("r0", "r1"))
    now = steps_seen(job)
    at = now + 1500
    first = subprocess.Popen(
        [*LOOMRUN, "set", "lr=0.5", "--at-step", str(at), "--job", job, "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: steps_seen(job) > now + 100, 60, what="the ranks to agree on it")
        code, later = set_json("lr=0.009", "--job", job)
        assert code == 0, later
        assert max(c["step"] for c in later["changes"]) < at
        out, _ = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    superseded = json.loads(out)
    assert first.returncode == 1 and superseded["result"] == "superseded", superseded
    assert {c["state"] for c in superseded["changes"]} == {"superseded"}
    wait_for(lambda: steps_seen(job) > at + 20, 120, what="the ranks to pass the old step")
    got = json.loads(run_loomrun("get", "--job", job, "--json").stdout)
    lrs = {p["replica"]: p["value"] for p in got["params"] if p["name"] == "lr"}
    assert lrs == {"r0": 0.009, "r1": 0.009}, "the superseded change never applied"
