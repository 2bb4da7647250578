"""Rules on a running job, as a user gives them (a --rules file at launch, `loomrun rule
add` on the job): tests/scripts/spiky.py's data turns bad at step 200, and the rule
`rollback; set lr=lr*0.5` fires on its own, goes back to a periodic snapshot taken
before the spike, halves lr, and the run ends near the run that never spiked (the
unsteered spiked run ends far worse); on 2 DDP ranks both act at one step and stay
bitwise identical. A spike of one step, shorter than a status interval, still fires a
rule that reads `loss.max`. The ledger records each firing with its values; --replay
runs with the rules off and ends bitwise equal."""

from __future__ import annotations

import json

import pytest
from conftest import run_loomrun, wait_for
from jobs import cli_json, job_id, wait_ready
from spiky_runs import SPIKY, at_least, final, hashes, reference, run_to_file, stop

from loomrun.broker.state import state_dir

BAD_FROM = 200
RULE = """[spike]
when = "loss.max > 3 * ema(loss.mean, 10)"
then = "rollback; set lr=lr*0.5"
cooldown = 100
"""


def records(job: str) -> list[dict]:
    return [json.loads(line) for line in (state_dir() / "jobs" / job / "changes.jsonl").open()]


def spiked_run(procs, tmp_path, name: str, replicas: int, steps: int = BAD_FROM + 150):
    """A run with the rule and a snapshot every 10 steps: returns its job, its output,
    the step the rollback landed at and its ledger records of the rule."""
    ranks = tuple(f"r{i}" for i in range(replicas))
    rules = tmp_path / "rules.toml"
    rules.write_text(RULE)
    job, sup, out = run_to_file(
        procs, tmp_path, name, "--step-time", "0.01", "--bad-from", BAD_FROM, replicas=replicas,
        extra=("--snapshot-every", "10", "--snapshot-keep", "6", "--rules", rules),
    )  # fmt: skip
    wait_ready(job, ranks)
    at_least(out, steps, ranks, timeout=240)
    last = stop(job, sup)
    found = [r for r in records(job) if r["who"] == "rule spike"]
    return job, out.read_text(), found, last


def check_rescued(text: str, found: list[dict], rank: str, last: int, replicas: int):
    fired = [r for r in found if r["outcome"] == "fired" and r["replica"] == rank]
    assert len(fired) == 1, found
    # Step BAD_FROM's own loss is bad, and its status (written as that step ends) may fire.
    assert fired[0]["step"] >= BAD_FROM and fired[0]["metrics"]["loss.max"] > 10
    assert fired[0]["name"] == "spike" and "ema(loss.mean, 10)" in fired[0]["metrics"]
    (rolled,) = [r for r in found if r["name"] == "rollback" and r["replica"] == rank]
    (halved,) = [r for r in found if r["name"] == "lr" and r["replica"] == rank]
    assert rolled["outcome"] == halved["outcome"] == "applied", found
    assert rolled["change_id"].startswith(fired[0]["change_id"])
    taken, at = rolled["new"]["step"], rolled["step"]
    assert taken < BAD_FROM and at > fired[0]["step"], rolled
    params = hashes(text, rank, "params")
    assert params[at + 1] == params[taken], "the parameters of the snapshot, bitwise"
    assert (halved["kind"], halved["old"], halved["new"]) == ("scale", 0.02, 0.01)
    assert float(hashes(text, rank, "lr")[halved["step"] + 1]) == 0.01
    rescued = final(text, rank)[0]
    spiked = reference(last, 4, replicas, BAD_FROM)
    clean = reference(last, 0, replicas, BAD_FROM)
    assert rescued < 0.6 * spiked, (rescued, spiked)
    assert rescued < 2.0 * clean, (rescued, clean)


def test_a_rule_rolls_back_a_spike_and_halves_lr_on_its_own(procs, tmp_path):
    job, text, found, last = spiked_run(procs, tmp_path, "rule-spike", 1)
    check_rescued(text, found, "r0", last, 1)
    log = run_loomrun("log", "--job", job)
    assert "rule spike fired at step" in log.stdout, log.stdout

    # The record holds what the rule did: --replay runs with the rules off, bitwise equal.
    rules = tmp_path / "rules.toml"
    again = run_loomrun(
        "--job", job_id("replayed"), "--replay", job, "--rules", rules, SPIKY,
        "--bad-from", BAD_FROM, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert final(again.stdout)[1] == final(text, "r0")[1], "the replay ends bitwise equal"
    assert "fired" not in again.stderr


@pytest.mark.slow
def test_two_ranks_fire_together_and_stay_identical(procs, tmp_path):
    job, text, found, last = spiked_run(procs, tmp_path, "rule-ddp", 2)
    for rank in ("r0", "r1"):
        check_rescued(text, found, rank, last, 2)
    steps = {(r["name"], r["step"]) for r in found}
    assert len(steps) == 3, f"each action at one step on both ranks: {found}"
    assert final(text, "r0")[2] == final(text, "r1")[2], "bitwise identical at the end"


def test_a_spike_shorter_than_a_status_fires_a_rule_added_live(procs, tmp_path):
    spike = 2000
    job, sup, out = run_to_file(
        procs, tmp_path, "rule-short", "--step-time", "0.002", "--bad-from", spike,
        "--bad-for", "1",
    )  # fmt: skip
    wait_ready(job)
    code, added = cli_json(
        "rule", "add", "blip", "--when", "loss.max > 10 * mean(loss.mean, 5)",
        "--then", "pause", "--job", job,
    )  # fmt: skip
    assert code == 0 and added["rule"]["then"] == "pause", added
    code, listed = cli_json("rule", "ls", "--job", job)
    assert [r["name"] for r in listed["rules"]] == ["blip"], listed
    assert max(hashes(out.read_text())) < spike, "the rule came before the spike"
    wait_for(lambda: any(r["name"] == "pause" for r in records(job)), 120, what="the pause")
    (fired,) = [r for r in records(job) if r["outcome"] == "fired"]
    (paused,) = [r for r in records(job) if r["name"] == "pause"]
    assert paused["outcome"] == "applied" and paused["who"] == "rule blip", paused
    assert paused["change_id"].startswith(fired["change_id"])
    losses = {step: float(loss) for step, loss in hashes(out.read_text(), of="loss").items()}
    assert spike < fired["step"] < spike + 200, fired
    assert fired["metrics"]["loss.max"] == pytest.approx(losses[spike], rel=1e-5)
    # The status it fired on came steps after the spike, whose loss was over by then: the
    # window's max saw what a status's last value alone would not have.
    assert losses[fired["step"]] < losses[spike] / 10 and fired["step"] > spike + 1
    removed = run_loomrun("rule", "rm", "blip", "--job", job)
    assert removed.returncode == 0 and "rule blip removed" in removed.stdout
    again = run_loomrun("rule", "rm", "blip", "--job", job)
    said = again.stderr.strip().splitlines()[-1]  # click's usage error: one line of it
    assert again.returncode == 2 and said == f"Error: job {job} has no rule 'blip' (it has: none)"
    bad = run_loomrun("rule", "add", "x", "--when", "loss >> 2", "--then", "pause", "--job", job)
    assert bad.returncode == 2 and "at character 7" in bad.stderr, bad.stderr
    assert run_loomrun("resume", "--job", job).returncode == 0
    stop(job, sup)
