"""Snapshots, rollback and save on a running job, steered through the CLI: a seeded script
whose data turns bad for a few steps (tests/scripts/spiky.py) is rolled back to before
the spike, its lr lowered, and it ends near the run that never spiked; on 2 DDP ranks the
ranks are bitwise identical after it; the run replays bitwise; a save loads with plain
`torch.load(weights_only=True)` in a fresh process and equals the live state of its step.

spiky.py prints, every step, a hash of its model's state_dict before that step's
optimizer step: a snapshot taken at step s holds what the hash of step s says, and after
a rollback applied at step r (whose own optimizer step then changes nothing) the hash of
the parameters at step r + 1 must be the snapshot's (the BatchNorm's statistics have moved
with step r + 1's forward by then: the unit tests check the buffers)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest
from conftest import SCRIPTS, run_loomrun, wait_for
from jobs import cli_json, job_id, one_step, wait_ready
from spiky_runs import SPIKY, at_least, final, hashes, reference, run_to_file, stop

from loomrun.broker.state import state_dir


def rescue(procs, tmp_path, name: str, replicas: int):
    """Launch with a snapshot every 10 steps (the last 40 kept: step-50 stays 400 steps),
    let the spike (steps 60-63) pass, roll back
    to before it, lower lr, and end 150 steps later. Returns the job, the output, the
    rollback's answer and the step the run ended at."""
    ranks = tuple(f"r{i}" for i in range(replicas))
    job, sup, out = run_to_file(
        procs, tmp_path, name, "--step-time", "0.01", replicas=replicas,
        extra=("--snapshot-every", "10", "--snapshot-keep", "40"),
    )  # fmt: skip
    wait_ready(job, ranks)
    at_least(out, 75, ranks)
    code, rolled = cli_json("rollback", "--before", "60", "--job", job)
    assert code == 0 and rolled["result"] == "applied", rolled
    for change in rolled["changes"]:
        assert change["new"]["name"] == "step-50" and change["new"]["step"] == 50, change
    at = one_step(rolled)
    code, lowered = cli_json("set", "lr=0.01", "--job", job)
    assert code == 0, lowered
    at_least(out, at + 150, ranks)
    return job, out, at, stop(job, sup)


@pytest.mark.slow
def test_a_loss_spike_rolled_back_ends_near_the_run_that_never_spiked(procs, tmp_path):
    job, out, at, last = rescue(procs, tmp_path, "spike", 1)
    text = out.read_text()
    seen = hashes(text, of="params")
    assert seen[at + 1] == seen[50], "the parameters of step 50, bitwise"
    assert seen[at] != seen[50]
    rescued, rescued_hash, _ = final(text, "r0")
    spiked, clean = reference(last, 4), reference(last, 0)
    assert rescued < 0.6 * spiked, (rescued, spiked)
    assert rescued < 2.0 * clean, (rescued, clean)

    records = [json.loads(line) for line in (state_dir() / "jobs" / job / "changes.jsonl").open()]
    rollbacks = [r for r in records if r["name"] == "rollback"]
    assert [(r["outcome"], r["step"], r["new"]["name"]) for r in rollbacks] == [
        ("applied", at, "step-50")
    ]
    events = run_loomrun("log", "--job", job)
    assert "rolled back to snapshot step-50 (taken at step 50)" in events.stdout, events.stdout

    # The record holds no snapshot (a periodic one): the replay takes it for the rollback.
    again = run_loomrun(
        "--no-broker", "--job", job_id("replayed"), "--replay", job, SPIKY, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert final(again.stdout)[1] == rescued_hash, "the replay ends bitwise equal"


@pytest.mark.slow
def test_two_ranks_roll_back_together_and_stay_identical(procs, tmp_path):
    job, out, at, last = rescue(procs, tmp_path, "spike-ddp", 2)
    text = out.read_text()
    r0, r1 = hashes(text, "r0", "params"), hashes(text, "r1", "params")
    assert r0[at + 1] == r0[50] and r1[at + 1] == r1[50]
    assert r0[at + 1] == r1[at + 1], "the ranks are bitwise identical after the rollback"
    assert final(text, "r0")[2] == final(text, "r1")[2], "and at the end"
    assert final(text, "r0")[0] < 0.6 * reference(last, 4, replicas=2)


@pytest.mark.slow
def test_ranks_that_do_not_all_hold_a_snapshot_none_rolls_back_and_at_step(procs, tmp_path):
    ranks = ("r0", "r1")
    job, sup, out = run_to_file(procs, tmp_path, "lacks", "--step-time", "0.01", replicas=2)
    wait_ready(job, ranks)
    at_least(out, 10, ranks)
    code, one = cli_json("snapshot", "mine", "--replica", "r0", "--force", "--job", job)
    assert code == 0 and one["changes"][0]["new"]["name"] == "mine", one
    code, back = cli_json("rollback", "mine", "--job", job)
    assert code == 1, back
    reasons = {c["replica"]: (c["state"], c["reason"]) for c in back["changes"]}
    assert reasons["r0"][0] == reasons["r1"][0] == "rejected"
    assert "the ranks do not all hold snapshot mine" in reasons["r0"][1]
    assert "this replica has no snapshot" in reasons["r1"][1]
    at = one_step(back)
    at_least(out, at + 2, ranks)
    text = out.read_text()
    r0, r1 = hashes(text, "r0", "params"), hashes(text, "r1", "params")
    assert r0[at + 1] == r1[at + 1], "neither rolled back: still identical"
    forced = run_loomrun("rollback", "mine", "--replica", "r0", "--force", "--job", job)
    assert forced.returncode == 2 and "would leave them different" in forced.stderr

    code, both = cli_json("snapshot", "both", "--job", job)
    assert code == 0, both
    taken = one_step(both)
    later = max(hashes(out.read_text(), "r0")) + 150  # agreed on now, done at its step
    code, back = cli_json("rollback", "both", "--at-step", later, "--job", job)
    assert code == 0 and one_step(back) == later, back
    at_least(out, later + 1, ranks)
    text = out.read_text()
    for rank in ranks:
        assert hashes(text, rank, "params")[later + 1] == hashes(text, rank, "params")[taken]
    stop(job, sup)


@pytest.mark.slow
def test_save_writes_one_file_per_rank_that_plain_torch_load_reads(procs, tmp_path):
    ranks = ("r0", "r1")
    job, sup, out = run_to_file(procs, tmp_path, "save", "--step-time", "0.01", replicas=2)
    wait_ready(job, ranks)
    at_least(out, 20, ranks)
    code, saved = cli_json("save", str(tmp_path / "ck" / "at-{step}"), "--job", job)
    assert code == 0 and saved["result"] == "applied", saved
    step = one_step(saved)
    folder = tmp_path / "ck" / f"at-{step}"
    assert sorted(p.name for p in folder.iterdir()) == ["r0.pt", "r1.pt"], "whole files only"
    for change in saved["changes"]:
        assert change["new"]["file"] == str(folder / f"{change['replica']}.pt")
        assert change["new"]["bytes"] == (folder / f"{change['replica']}.pt").stat().st_size
    at_least(out, step + 1, ranks)
    stop(job, sup)
    text = out.read_text()
    read = subprocess.run(
        [sys.executable, "-c", LOAD, str(folder / "r0.pt"), str(folder / "r1.pt")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert read.returncode == 0, read.stderr
    loaded = json.loads(read.stdout)
    for replica in ranks:
        got = loaded[replica]
        assert got["hash"] == hashes(text, replica)[step], "the live state of its step"
        assert (got["step"], got["replica"], got["world_size"]) == (step, replica, 2)
        assert got["rank"] == int(replica[1:])
        assert set(got["keys"]) >= {"optimizers", "schedulers", "rng", "values", "modules"}
        assert got["values"]["lr"] == pytest.approx(0.02)


# A fresh process, plain torch: the digest spiky.py prints, of the saved module.
LOAD = """
import hashlib, json, sys, torch
out = {}
for path in sys.argv[1:]:
    data = torch.load(path, weights_only=True)
    state = data["modules"][0]["state_dict"]
    blob = b"".join(t.contiguous().numpy().tobytes() for t in state.values())
    out[data["replica"]] = {
        "hash": hashlib.sha256(blob).hexdigest()[:16], "step": data["step"],
        "replica": data["replica"], "rank": data["rank"], "world_size": data["world_size"],
        "keys": sorted(data), "values": data["values"],
    }
print(json.dumps(out))
"""


def test_snapshots_listed_named_periodic_and_each_answer_its_own(procs, tmp_path):
    job, sup, out = run_to_file(procs, tmp_path, "named", "--step-time", "0.005")
    wait_ready(job)
    at_least(out, 5)
    code, first = cli_json("snapshot", "a", "--job", job)
    assert code == 0, first
    code, second = cli_json("snapshot", "a", "--job", job)
    assert code == 0, second
    one, two = first["changes"][0], second["changes"][0]
    assert one["change_id"] != two["change_id"]
    assert one["new"]["step"] == one["step"] and two["new"]["step"] == two["step"] > one["step"]
    assert two["new"]["bytes"] > 0 and two["new"]["seconds"] >= 0

    code, every = cli_json("snapshot", "--every", "5", "--keep", "2", "--job", job)
    assert code == 0 and every["changes"][0]["new"] == {"every": 5, "keep": 2}, every
    at_least(out, every["changes"][0]["step"] + 20)

    def listing():
        result = run_loomrun("snapshot", "--list", "--job", job, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    found = wait_for(
        lambda: (x := listing()) and len([s for s in x["snapshots"] if s["periodic"]]) == 2 and x,
        30,
        what="two periodic snapshots",
    )
    named = [s for s in found["snapshots"] if not s["periodic"]]
    assert [(s["name"], s["step"], s["replicas"]) for s in named] == [("a", two["step"], ["r0"])]
    assert all(s["step"] % 5 == 0 for s in found["snapshots"] if s["periodic"])
    assert found["periodic"] == {"r0": {"every": 5, "keep": 2}}

    code, held = cli_json("set", "lr=0.004", "--hold", "--job", job)
    assert code == 0, held
    code, back = cli_json("rollback", "a", "--job", job)
    assert code == 0, back
    at = one_step(back)
    at_least(out, at + 3)
    lrs, counts = hashes(out.read_text(), of="lr"), hashes(out.read_text(), of="sched")
    assert {lrs[s] for s in range(at + 1, at + 4)} == {"0.004"}, "a steered value stays"
    assert counts[at + 1] == counts[two["step"]], "the scheduler back at the snapshot's step"

    assert back["changes"][0]["old"] == {"step": at}
    at_least(out, at + 1)
    seen = hashes(out.read_text(), of="params")
    assert seen[at + 1] == seen[two["step"]], "the second snapshot named a, not the first"

    code, missing = cli_json("rollback", "nope", "--job", job)
    assert code == 1 and "no snapshot named 'nope'" in missing["changes"][0]["reason"]
    words = run_loomrun("rollback", "--before", "3", "--job", job)
    assert words.returncode == 1
    assert "has no snapshot taken before step 3" in words.stdout, words.stdout
    stop(job, sup)


@pytest.mark.slow
def test_a_lightning_save_is_the_trainers_own_checkpoint_that_ckpt_path_resumes(procs, tmp_path):
    pytest.importorskip("lightning")
    job = job_id("lightning-save")
    sup = procs.start("--job", job, SCRIPTS / "lightning_train.py")
    wait_ready(job, name="dropout", timeout=120)
    code, saved = cli_json("save", str(tmp_path / "ck"), "--job", job)
    assert code == 0 and saved["result"] == "applied", saved
    step = one_step(saved)
    path = tmp_path / "ck" / "r0.ckpt"  # a replica of its own (a group's: checkpoint.ckpt)
    assert saved["changes"][0]["new"]["file"] == str(path) and path.stat().st_size > 0
    out, err = sup.communicate(timeout=300)
    assert sup.returncode == 0, err
    resumed = subprocess.run(
        [sys.executable, SCRIPTS / "lightning_train.py", "--resume", str(path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    # Saved at the start of loomrun's step `step`: the trainer had done step - 1 of its own.
    assert f"start at global step {step - 1}" in resumed.stdout, resumed.stdout


@pytest.mark.parametrize("broker", [True, False], ids=["broker", "no-broker"])
def test_sigusr1_to_the_supervisor_saves_every_replica(procs, tmp_path, broker):
    extra = ("--save-dir", tmp_path / "saves") + (() if broker else ("--no-broker",))
    job, sup, out = run_to_file(
        procs, tmp_path, "usr1", "--step-time", "0.01", replicas=2, extra=extra
    )  # fmt: skip
    at_least(out, 20, ("r0", "r1"))
    sup.send_signal(signal.SIGUSR1)
    files = lambda: sorted((tmp_path / "saves").glob("usr1-1-step-*/r*.pt"))  # noqa: E731
    found = wait_for(lambda: len(files()) == 2 and files(), 60, what="both files")
    assert [p.name for p in found] == ["r0.pt", "r1.pt"]
    step = int(found[0].parent.name.rsplit("-", 1)[1])
    if broker:
        wait_ready(job, ("r0", "r1"))
        stop(job, sup)
        records = (state_dir() / "jobs" / job / "changes.jsonl").read_text().splitlines()
        saves = [json.loads(r) for r in records if json.loads(r)["name"] == "save"]
        assert {(r["replica"], r["outcome"], r["step"], r["who"]) for r in saves} == {
            (r, "applied", step, "SIGUSR1") for r in ("r0", "r1")
        }
    else:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=60)
    text = out.read_text()
    for path in found:
        data = torch_load(path)
        assert data["step"] == step
        assert data["hash"] == hashes(text, data["replica"])[step]


def torch_load(path) -> dict:
    """A saved file as a fresh process with plain torch reads it (LOAD, for one file)."""
    read = subprocess.run(
        [sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, timeout=120
    )
    assert read.returncode == 0, read.stderr
    return next(iter(json.loads(read.stdout).values()))


@pytest.mark.slow
def test_the_hugging_face_trainer_rolls_back_its_weights_and_its_schedule(procs, tmp_path):
    """Under the Trainer (accelerate's wrapped optimizer and scheduler, a linear decay
    that moves lr every step): the step a rollback lands in changes nothing (it runs with
    the snapshot's lr), and the next steps run the snapshot's schedule again from its
    first step: the scheduler skipped its step in the no-op one."""
    pytest.importorskip("transformers")
    job = job_id("hf-rollback")
    out = tmp_path / "hf.out"
    with out.open("w") as sink:
        sup = procs.start("--job", job, SCRIPTS / "hf_trainer.py", stdout=sink)
    wait_ready(job, timeout=120)

    def stepped() -> dict[int, str]:
        return {
            int(m[1]): m[2]
            for m in re.finditer(r"^\[r0\] stepped (\d+) (.+)$", out.read_text(), re.M)
        }

    wait_for(lambda: len(stepped()) >= 20, 120, what="20 steps")
    code, taken = cli_json("snapshot", "hf", "--job", job)
    assert code == 0, taken
    at_snapshot = one_step(taken)
    wait_for(lambda: len(stepped()) >= at_snapshot + 30, 120, what="30 more steps")
    code, back = cli_json("rollback", "hf", "--job", job)
    assert code == 0, back
    at = one_step(back)
    wait_for(lambda: len(stepped()) >= at + 6, 120, what="steps after the rollback")
    stop(job, sup)
    lrs = stepped()
    assert lrs[at_snapshot + 1] != lrs[at_snapshot], "(the schedule moves every step)"
    assert lrs[at] == lrs[at_snapshot], "the no-op step, with the snapshot's lr"
    for k in range(5):  # then the snapshot's steps again, from its first
        assert lrs[at + 1 + k] == lrs[at_snapshot + k], (k, lrs[at + 1 + k])
