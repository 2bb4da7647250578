"""The change ledger, for real: every answered change recorded once, in order, in the
broker and on disk, and `loomrun log` reading it back, from the broker or from disk."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading

import pytest
from conftest import LOOMRUN, SCRIPTS, run_loomrun, wait_for
from jobs import job_id, start, steps_seen, wait_ready

from loomrun.broker.state import state_dir
from loomrun.launch import free_port


def log(*args, **kwargs) -> list[dict]:
    result = run_loomrun("log", *args, "--json", **kwargs)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_change_is_recorded_once_in_order_and_outlives_the_broker(procs, tmp_path):
    job = job_id("ledger")
    sup = start(
        procs, SCRIPTS / "steered.py", "--steps", "10000000", "--quiet", job=job,
        extra=("--log-dir", tmp_path),
    )  # fmt: skip
    wait_ready(job)
    for command in (
        ["set", "lr=0.05"],
        ["pause"],
        ["resume"],
        ["set", "lr=0.07", "--at-step", "1"],
    ):
        run_loomrun(*command, "--job", job)
    follower = subprocess.Popen(
        [*LOOMRUN, "log", "--job", job, "--json", "--follow"], stdout=subprocess.PIPE, text=True
    )
    followed: list[str] = []
    threading.Thread(target=lambda: followed.extend(follower.stdout), daemon=True).start()
    on_disk = state_dir() / "jobs" / job / "changes.jsonl"
    try:
        on_disk.rename(on_disk.with_suffix(".aside"))  # so this read is the broker's
        try:
            recorded = log("--job", job)
        finally:
            on_disk.with_suffix(".aside").rename(on_disk)
        shown = [(r["name"], r["outcome"], r["old"], r["new"]) for r in recorded]
        assert shown == [
            ("lr", "applied", 0.1, 0.05),
            ("pause", "applied", False, True),
            ("pause", "applied", True, False),
            ("lr", "missed", None, 0.07),
        ], shown
        assert recorded[0]["who"] and "@" in recorded[0]["who"]
        assert recorded[0]["step"] > 0 and recorded[0]["replica"] == "r0"
        assert len({r["change_id"] for r in recorded}) == len(recorded), "each change once"
        run_loomrun("set", "lr=0.09", "--job", job)
        wait_for(
            lambda: any('"new": 0.09' in line for line in followed), 30,
            what="the new change followed",
        )  # fmt: skip
    finally:
        follower.kill()
        follower.communicate()
    sup.terminate()
    sup.communicate(timeout=60)
    everything = log("--job", job)
    nobroker = f"nats://127.0.0.1:{free_port()}"
    assert log("--job", job, "--nats", nobroker) == everything, "the same, from disk"
    copied = (tmp_path / job / "changes.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in copied] == everything
    assert log("--job", job, "--replica", "r1") == []


def test_a_job_without_a_ledger_is_one_line():
    result = run_loomrun("log", "--job", "nosuchjob", "--nats", f"nats://127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "no change ledger for job 'nosuchjob'" in result.stderr


def test_a_job_without_records_on_a_purged_ledger_stream_is_read_at_once(procs):
    """The broker's ledger stream no longer starts at 1 (a job's start purged an earlier
    run's records): a job with no record yet has an empty ledger, not one waited on for
    ever."""
    from jobs import steering

    from loomrun import subjects as S
    from loomrun._proto import loomrun_pb2 as pb

    job = job_id("purged")
    start(procs, SCRIPTS / "steered.py", "--steps", "10000000", "--quiet", job=job)
    wait_ready(job)  # the stream is there

    async def purge_one(s):
        await s.js.publish(S.ledger(job, 0), pb.Outcome(change_id="x").SerializeToString())
        await s.js.purge_stream(S.LEDGER_STREAM)  # the first sequence moves past it

    steering(purge_one)
    result = run_loomrun("log", "--job", job, timeout=30)  # it hung here
    assert result.returncode == 0 and result.stdout == "", result.stderr


def test_a_damaged_ledger_file_is_read_for_what_it_holds():
    """Bytes that are not text and a time no clock can show: left out, the rest shown."""
    job = job_id("damaged")
    folder = state_dir() / "jobs" / job
    folder.mkdir(parents=True)
    good = {"time": 1.7e9, "who": "a@b", "job": job, "replica": "r0", "name": "lr", "old": 0.1,
            "new": 0.2, "step": 3, "outcome": "applied", "reason": None, "change_id": "good",
            "revision": 1}  # fmt: skip
    (folder / "changes.jsonl").write_bytes(
        bytes(range(128, 256)) + b"\n" + json.dumps({**good, "time": 1e300}).encode() + b"\n"
        + json.dumps(good).encode() + b"\n"
    )  # fmt: skip
    nobroker = f"nats://127.0.0.1:{free_port()}"
    shown = run_loomrun("log", "--job", job, "--nats", nobroker)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert (
        len(shown.stdout.splitlines()) == 1
        and "applied     lr 0.1 -> 0.2 at step 3  (a@b)" in shown.stdout
    )


def _hashes(out: str) -> set[str]:
    return set(re.findall(r"hash (\w+)", out))


@pytest.mark.slow
def test_a_replayed_ddp_run_ends_bitwise_where_the_steered_one_did(procs):
    steered = job_id("steered")
    sup = start(
        procs, SCRIPTS / "ddp_seeded.py", "--steps", "500", "--step-time", "0.01",
        job=steered, replicas=2,
    )  # fmt: skip
    wait_ready(steered, ("r0", "r1"))
    for change in ("lr=0.05", "momentum=0.5", "loss_scale=2.0"):  # at moments of their own
        now = steps_seen(steered)
        wait_for(lambda now=now: steps_seen(steered) > now + 25, 60, what="more steps")
        result = run_loomrun("set", change, "--job", steered)
        listed = run_loomrun("ls", "--all").stdout
        assert result.returncode == 0, result.stdout + result.stderr + listed
    out, err = sup.communicate(timeout=180)
    assert sup.returncode == 0, err
    first = _hashes(out)
    assert len(first) == 1, "the ranks agree"

    again = run_loomrun(
        "--replicas", "2", "--no-broker", "--job", job_id("replayed"), "--replay", steered,
        SCRIPTS / "ddp_seeded.py", "--steps", "500", timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "replaying 6 change(s)" in again.stderr
    assert _hashes(again.stdout) == first, "the replay ends bitwise where the steered run did"
    plain = run_loomrun(
        "--replicas", "2", "--no-broker", "--job", job_id("plain"),
        SCRIPTS / "ddp_seeded.py", "--steps", "500", timeout=300,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert len(_hashes(plain.stdout)) == 1 and _hashes(plain.stdout) != first


def test_unset_goes_back_to_the_scripts_own_value(procs):
    job = job_id("unset")
    start(procs, SCRIPTS / "steered.py", "--steps", "10000000", "--quiet", job=job)
    wait_ready(job, name="batch")
    wait_ready(job)
    assert run_loomrun("set", "lr=0.05", "batch=16", "--job", job).returncode == 0

    def params() -> dict[str, dict]:
        got = run_loomrun("get", "--job", job, "--json")
        return {p["name"]: p for p in json.loads(got.stdout)["params"]}

    wait_for(lambda: params()["batch"]["value"] == 16, 10, what="the status to show batch")
    before = params()
    assert before["lr"]["steered"] and before["lr"]["own"] == 0.1
    assert before["batch"]["steered"] and before["batch"]["own"] == 8
    assert not before["momentum"]["steered"]
    undone = run_loomrun("unset", "lr", "batch", "--job", job)
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert "r0  batch 16 -> 8, lr 0.05 -> 0.1 (the script's) at step" in undone.stdout
    wait_for(lambda: not params()["batch"]["steered"], 10, what="the status to show it")
    assert not params()["lr"]["steered"]
    unknown = run_loomrun("unset", "nope", "--job", job)
    assert unknown.returncode == 2 and "has no parameter 'nope'" in unknown.stderr


def test_a_ledger_stream_an_earlier_loomrun_made_takes_each_nodes_part(procs):
    """An earlier loomrun made the ledger's stream on `loomrun.*.ledger` (one part a job):
    a supervisor adds the nodes' parts to it, and the old records stay."""
    from jobs import steering
    from nats.js import api

    from loomrun import subjects as S
    from loomrun._proto import loomrun_pb2 as pb

    job = job_id("oldstream")
    old = pb.Outcome(replica="r0", name="lr", state=pb.APPLIED, change_id="kept")

    async def remake(s):
        with contextlib.suppress(Exception):
            await s.js.delete_stream(S.LEDGER_STREAM)
        await s.js.add_stream(
            name=S.LEDGER_STREAM, subjects=["loomrun.*.ledger"],
            storage=api.StorageType.FILE, max_age=S.LEDGER_DAYS * 86400,
        )  # fmt: skip
        await s.js.publish(f"loomrun.{job}-old.ledger", old.SerializeToString())

    async def stream(s):
        return await s.js.stream_info(S.LEDGER_STREAM)

    steering(remake)
    sup = start(procs, SCRIPTS / "steered.py", "--steps", "10000000", "--quiet", job=job)
    wait_ready(job)
    assert run_loomrun("set", "lr=0.05", "--job", job).returncode == 0
    sup.terminate()
    sup.communicate(timeout=60)
    on_disk = state_dir() / "jobs" / job / "changes.jsonl"
    on_disk.rename(on_disk.with_suffix(".aside"))  # so this read is the broker's
    try:
        assert [(r["name"], r["new"]) for r in log("--job", job)] == [("lr", 0.05)]
    finally:
        on_disk.with_suffix(".aside").rename(on_disk)
    info = steering(stream)
    assert info.config.subjects == ["loomrun.*.ledger", S.LEDGER_SUBJECTS]
    assert info.config.duplicate_window == S.LEDGER_DEDUP_SECONDS, "JetStream's 2 min, made longer"
    kept = log("--job", f"{job}-old")  # from the broker: no file on disk has it
    assert [r["change_id"] for r in kept] == ["kept"], "the old record is kept, and read"
