"""One `set` of several keys is one change, for real: one id, applied at one step on every
rank of a group or not at all, one answer per replica, one ledger record, one replay
entry."""

from __future__ import annotations

import json
import re
import signal

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


def _trace(out: str) -> dict[int, tuple[str, float]]:
    found = re.finditer(r"step (\d+) (\w+) loss (\S+)", out)
    return {int(m[1]): (m[2], float(m[3])) for m in found}


@pytest.mark.slow
def test_sgd_switched_to_adamw_live_on_both_ranks_at_one_step_then_replayed(procs):
    """The optimizer switch with no code, as one change with its hyperparameters."""
    job = job_id("switch")
    sup = start(
        procs, SCRIPTS / "ddp_seeded.py", "--steps", "400", "--step-time", "0.01", "--trace",
        job=job, replicas=2,
    )  # fmt: skip
    wait_ready(job, ("r0", "r1"), name="optimizer")
    got = json.loads(run_loomrun("get", "--job", job, "--json").stdout)
    before = {(p["replica"], p["name"]): p for p in got["params"]}
    assert before[("r0", "optimizer")]["value"] == "sgd" and ("r0", "betas") not in before
    assert "adamw" in before[("r0", "optimizer")]["type"]
    wrong = run_loomrun("set", "optimizer=adamw", "momentum=0.5", "--job", job)
    assert wrong.returncode == 2 and "adamw has no momentum" in wrong.stderr, wrong.stderr
    now = steps_seen(job)
    wait_for(lambda: steps_seen(job) > now + 50, 60, what="some steps on SGD")
    code, answer = set_json(
        "optimizer=adamw", "lr=0.003", "betas=0.9,0.95", "weight_decay=0.01", "--job", job
    )
    assert code == 0, answer
    [step] = {c["step"] for c in answer["changes"]}
    for c in answer["changes"]:
        parts = {p["name"]: (p["old"], p["new"]) for p in c["parts"]}
        assert parts["optimizer"] == ("sgd", "adamw") and parts["betas"][1] == [0.9, 0.95]
        assert "state reset (momentum_buffer)" in c["reason"], c
    got = json.loads(run_loomrun("get", "--job", job, "--json").stdout)
    after = {(p["replica"], p["name"]): p for p in got["params"]}
    assert after[("r1", "optimizer")]["value"] == "adamw"
    assert after[("r1", "betas")]["value"] == [0.9, 0.95] and ("r1", "momentum") not in after
    out, err = sup.communicate(timeout=180)
    assert sup.returncode == 0, err
    trace = _trace(out)  # both ranks print: the same lines twice when they agree
    kinds = {s: k for s, (k, _) in trace.items()}
    assert kinds[step - 1] == "SGD" and kinds[step] == "AdamW" and kinds[400] == "AdamW"
    assert len(set(re.findall(rf"step {step} (\w+)", out))) == 1, "both ranks, one class"
    losses = [trace[s][1] for s in range(step, 401)]
    assert sum(losses[-20:]) < sum(losses[:20]), "the loss keeps falling under AdamW"
    first = _hashes(out)
    assert len(first) == 1, "the ranks are bitwise identical"

    again = run_loomrun(
        "--replicas", "2", "--no-broker", "--job", job_id("switched"), "--replay", job,
        SCRIPTS / "ddp_seeded.py", "--steps", "400", "--trace", timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert _hashes(again.stdout) == first, "the replay ends bitwise where the switched run did"
    assert _trace(again.stdout)[step][0] == "AdamW"


def test_unset_optimizer_goes_back_to_the_scripts_own_kind(procs):
    job = job_id("unswitch")
    start(procs, SCRIPTS / "steered.py", "--steps", "10000000", "--quiet", job=job)
    wait_ready(job, name="optimizer")
    code, answer = set_json("optimizer=rmsprop", "lr=0.001", "--job", job)
    assert code == 0, answer
    code, answer = set_json("momentum=0.5", "--job", job)
    assert code == 0 and answer["changes"][0]["old"] == 0.0, "RMSprop's own default momentum"
    undone = run_loomrun("unset", "optimizer", "--job", job)
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert "optimizer rmsprop -> sgd (the script's)" in undone.stdout

    def params() -> dict[str, dict]:
        got = run_loomrun("get", "--job", job, "--json")
        return {p["name"]: p for p in json.loads(got.stdout)["params"]}

    wait_for(lambda: params()["optimizer"]["value"] == "sgd", 10, what="the status to show it")
    momentum = params()["momentum"]
    assert momentum["own"] == 0.9, "the script's own momentum again (SGD's, not RMSprop's 0)"
    assert momentum["value"] == 0.5 and momentum["steered"], "the change stays in effect"


@pytest.mark.slow
def test_the_switch_holds_under_lightning_with_no_code(procs):
    job = job_id("lightswitch")
    sup = start(procs, SCRIPTS / "lightning_train.py", job=job)
    wait_ready(job, name="optimizer")
    code, answer = set_json("optimizer=adam", "lr=0.01", "--job", job)
    assert code == 0, answer
    assert answer["changes"][0]["parts"][1]["old"] == "sgd"
    out, err = sup.communicate(timeout=180)
    assert sup.returncode == 0, err
    assert "epoch 29 lr 0.01 dropout 0.0 Adam" in out, out[-1500:]


@pytest.mark.slow
def test_the_switch_holds_under_the_hugging_face_trainer(procs):
    """The Trainer's own AdamW, under accelerate's wrapper and a LambdaLR, becomes SGD."""
    job = job_id("hfswitch")
    sup = start(procs, SCRIPTS / "hf_trainer.py", "--max-steps", "300", job=job)
    wait_ready(job, name="optimizer", timeout=120)
    code, answer = set_json("optimizer=sgd", "lr=0.01", "momentum=0.9", "--job", job)
    assert code == 0, answer
    [change] = answer["changes"]
    assert [(p["name"], p["old"], p["new"]) for p in change["parts"]][1:] == [
        ("momentum", None, 0.9),
        ("optimizer", "adamw", "sgd"),
    ], change
    out, err = sup.communicate(timeout=300)
    assert sup.returncode == 0, err
    assert "optimizer SGD" in out, "the Trainer's own optimizer object, switched"
    steps = [int(m[1]) for m in re.finditer(r"stepped (\d+) ", out)]
    assert steps == list(range(1, 301)), "every step ran, through the end, on the one object"


@pytest.mark.slow
def test_the_lightning_handler_recipe_in_the_docs_switches_the_optimizer(procs, tmp_path):
    """docs/recipes.md's code block, run as it is written there."""
    text = (SCRIPTS.parent.parent / "docs" / "recipes.md").read_text()
    block = re.search(r"```python\n(# The recipe.*?)```", text, re.S)
    assert block, "the recipe's code block"
    recipe = tmp_path / "recipe.py"
    recipe.write_text(block[1])
    job, out = job_id("recipe"), tmp_path / "recipe.out"
    with out.open("w") as sink:
        sup = procs.start("--job", job, recipe, "100000", stdout=sink)
    wait_ready(job, name="optimizer_type")
    code, answer = set_json("optimizer_type=adam", "--job", job)
    assert code == 0, answer
    assert answer["changes"][0]["old"] == "sgd" and answer["changes"][0]["new"] == "adam"
    wait_for(lambda: "Adam" in out.read_text(), 120, what="an epoch stepped with Adam")
    sup.send_signal(signal.SIGINT)
    sup.communicate(timeout=120)
    kinds = re.findall(r"epoch \d+ (\w+)", out.read_text())
    switched = kinds.index("Adam")
    assert set(kinds[:switched]) <= {"SGD"} and set(kinds[switched:]) == {"Adam"}, kinds


def test_the_switch_can_be_left_out(procs):
    """LOOMRUN_OPTIMIZER_SWITCH=0: torch's classes as they are, no `optimizer` built-in."""
    job = job_id("noswitch")
    start(
        procs, SCRIPTS / "steered.py", "--steps", "10000000", "--quiet", job=job,
        env={"LOOMRUN_OPTIMIZER_SWITCH": "0"},
    )  # fmt: skip
    wait_ready(job, name="momentum")
    got = json.loads(run_loomrun("get", "--job", job, "--json").stdout)
    assert "optimizer" not in {p["name"] for p in got["params"]}
    refused = run_loomrun("set", "optimizer=adam", "--job", job)
    assert refused.returncode == 2 and "has no parameter 'optimizer'" in refused.stderr
