"""One `set` of several keys is one change, for real: one id, applied at one step on every
rank of a group or not at all, one answer per replica, one ledger record, one replay
entry."""

from __future__ import annotations

import json
import re

import pytest
from conftest import SCRIPTS, run_loomrun, wait_for
from jobs import job_id, start, steps_seen, wait_ready


def set_json(*args) -> tuple[int, dict]:
    result = run_loomrun("set", *args, "--json")
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout) if result.stdout else {}


def _hashes(out: str) -> set[str]:
    return set(re.findall(r"hash (\w+)", out))


@pytest.mark.slow
def test_three_keys_of_one_set_land_at_one_step_on_both_ranks_and_replay_bitwise(procs):
    """lr and momentum (answered after the optimizer step that ran with them) and a
    declared parameter, in one `set` to a 2-rank DDP group."""
    job = job_id("together")
    sup = start(
        procs, SCRIPTS / "ddp_seeded.py", "--steps", "500", "--step-time", "0.01",
        job=job, replicas=2,
    )  # fmt: skip
    wait_ready(job, ("r0", "r1"))
    wait_ready(job, ("r0", "r1"), name="momentum")
    now = steps_seen(job)
    wait_for(lambda: steps_seen(job) > now + 25, 60, what="more steps")
    code, answer = set_json("lr=0.05", "momentum=0.5", "loss_scale=2.0", "--job", job)
    assert code == 0, answer
    changes = answer["changes"]
    assert sorted(c["replica"] for c in changes) == ["r0", "r1"], "one answer per replica"
    assert len({c["change_id"] for c in changes}) == 1, "one change id"
    assert len({c["step"] for c in changes}) == 1, "every key, both ranks, one step"
    for c in changes:
        assert c["state"] == "applied"
        assert [(p["name"], p["old"], p["new"]) for p in c["parts"]] == [
            ("loss_scale", 1.0, 2.0),
            ("lr", 0.01, 0.05),
            ("momentum", 0.9, 0.5),
        ], c
    said = run_loomrun("set", "lr=0.04", "momentum=0.6", "--job", job)
    assert said.returncode == 0, said.stdout + said.stderr
    lines = said.stdout.splitlines()
    assert len(lines) == 2 and all(
        re.fullmatch(
            r"r[01]  lr 0\.05 -> 0\.04, momentum 0\.5 -> 0\.6 at step \d+  \(.* ms\)", line
        )
        for line in lines
    ), said.stdout
    out, err = sup.communicate(timeout=180)
    assert sup.returncode == 0, err
    first = _hashes(out)
    assert len(first) == 1, "the ranks are bitwise identical"

    log = run_loomrun("log", "--job", job, "--json")
    records = [json.loads(line) for line in log.stdout.splitlines()]
    assert len(records) == 4, "one record per replica per change"
    assert {len(r["parts"]) for r in records} == {2, 3}

    again = run_loomrun(
        "--replicas", "2", "--no-broker", "--job", job_id("again"), "--replay", job,
        SCRIPTS / "ddp_seeded.py", "--steps", "500", timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "replaying 4 change(s)" in again.stderr
    assert _hashes(again.stdout) == first, "the replay ends bitwise where the steered run did"


def test_a_change_one_key_of_which_the_worker_refuses_is_applied_nowhere(procs):
    """The client's check passes (the handler itself refuses -4): neither key applies."""
    job = job_id("refused")
    start(procs, SCRIPTS / "declared.py", job=job)
    wait_ready(job, name="batch_size")
    code, refused = set_json("temperature=0.3", "batch_size=-4", "batch=64", "--job", job)
    assert code == 1 and refused["result"] == "rejected", refused
    [answer] = refused["changes"]
    assert (
        answer["reason"]
        == "batch_size handler raised ValueError: batch_size must be positive, not -4"
    )
    assert [p["name"] for p in answer["parts"]] == ["batch", "batch_size", "temperature"]

    def values() -> dict:
        got = json.loads(run_loomrun("get", "--job", job, "--json").stdout)
        return {p["name"]: p["value"] for p in got["params"]}

    assert values()["batch"] == 32 and values()["temperature"] == 1.0
    code, fine = set_json("temperature=0.3", "batch=64", "--job", job)
    assert code == 0 and fine["changes"][0]["state"] == "applied", fine
    wait_for(lambda: values()["batch"] == 64, 10, what="the status to show batch")
    bad = run_loomrun("set", "temperature=0.5", "batch=0", "--job", job)
    assert bad.returncode == 2 and "batch" in bad.stderr, "checked by the client: nothing sent"
    assert values()["temperature"] == 0.3
