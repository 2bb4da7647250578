"""Structured parameters for real: a nested dataclass, a dict, a TypedDict, a list of
dataclasses and a handler, steered whole (JSON) and field by field (`sched/warmup/steps`)
in a torch loop; the script sees a new instance of its own types on each change; fields
set by two clients at once both hold; a restart applies fields, whole values and unsets
in the order they were made; a replay ends bitwise equal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import jsonschema
import pytest
from conftest import LOOMRUN, SCRIPTS, run_loomrun, wait_for
from jobs import job_id, start, steps_seen, wait_ready

SCRIPT = SCRIPTS / "structured.py"


def set_json(*args) -> tuple[int, dict]:
    result = run_loomrun("set", *args, "--json")
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout) if result.stdout else {}


def values(job: str) -> dict:
    got = json.loads(run_loomrun("get", "--job", job, "--json").stdout)
    return {p["name"]: p["value"] for p in got["params"]}


def seen(out: str) -> list[tuple[int, str, object]]:
    """The script's own account: (step, name, value) each time a value it saw changed."""
    found = re.finditer(r"seen (\d+) (\w+) (.*)", out)
    return [(int(m[1]), m[2], json.loads(m[3])) for m in found]


def _parts(answer: dict) -> list[tuple]:
    [change] = answer["changes"]
    return [(p["name"], p["old"], p["new"]) for p in change.get("parts", [])] or [
        (change["name"], change["old"], change["new"])
    ]


@pytest.mark.slow
def test_fields_and_whole_values_steer_a_real_loop_then_replay_bitwise(procs):
    job = job_id("structured")
    sup = start(procs, SCRIPT, "--steps", "1500", "--step-time", "0.01", job=job)
    wait_ready(job, name="sched")
    before = values(job)
    assert before["sched"] == {
        "warmup": {"steps": 100, "start": 0.1},
        "peak": 1.0,
        "name": "linear",
    }
    assert before["blocks"] == [{"width": 8}, {"width": 16}]
    wait_for(lambda: steps_seen(job) > 20, 60, what="some steps on the defaults")

    # Two fields of one parameter in one set: one change, one answer with each field's
    # old and new value, seen by the script at one step.
    code, answer = set_json("sched/warmup/steps=200", "sched/peak=0.5", "--job", job)
    assert code == 0, answer
    assert _parts(answer) == [("sched/peak", 1.0, 0.5), ("sched/warmup/steps", 100, 200)]

    # Refused before anything is written: one line naming the path, exit 2.
    for args, message in [
        (["sched/warmup/stps=3"], "no field 'sched/warmup/stps' (did you mean 'sched/warmup/st"),
        (["sched/peak=-1"], "invalid value for sched/peak: -1.0 is below the minimum 0"),
        (["sched.peak=0.1"], "goes by its path with '/' (sched/peak)"),
        (["blocks/0/width=x"], "invalid value for blocks/0/width: expected an integer"),
        (["mix={\"alpha\": 0.4}"], "invalid value for mix: field 'on' is missing"),
        (["sched={\"peak\": 1, \"warmpu\": {}}"], "no field 'warmpu' (did you mean 'warmup'?)"),
        (["sched/peak=0.1", "sched={}"], "sched/peak is inside sched"),
        (["lr/x=1"], "no field 'lr/x': lr is a float"),
    ]:  # fmt: skip
        bad = run_loomrun("set", *args, "--job", job)
        assert bad.returncode == 2, (args, bad.stderr)
        assert message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr

    # A dict's key with a dot, a new key, a whole TypedDict, a list's item, a handler's field.
    code, answer = set_json("aug/x.y=2", "aug/q=0.25", "--job", job)
    assert code == 0 and _parts(answer) == [("aug/q", None, 0.25), ("aug/x.y", 1.0, 2.0)]
    code, answer = set_json('mix={"alpha": 0.4, "on": false}', "--job", job)
    assert code == 0 and _parts(answer) == [
        ("mix", {"alpha": 0.2, "on": True}, {"alpha": 0.4, "on": False})
    ]
    code, answer = set_json("blocks/1/width=2", "head/steps=9", "--job", job)
    assert code == 0 and _parts(answer) == [("blocks/1/width", 16, 2), ("head/steps", 5, 9)]
    code, answer = set_json("blocks/3/width=2", "--job", job)  # checked by the worker
    assert code == 1 and "blocks has 2 items in effect" in answer["changes"][0]["reason"]

    # Two clients at once, each a different field of sched: neither undoes the other.
    clients = [
        subprocess.Popen([*LOOMRUN, "set", change, "--job", job], stdout=subprocess.PIPE, text=True)
        for change in ("sched/peak=0.75", "sched/name=cosine")
    ]
    assert [c.wait(timeout=60) for c in clients] == [0, 0]
    for c in clients:
        c.stdout.close()
    wait_for(lambda: values(job)["sched"]["name"] == "cosine", 10, what="get to show both")
    assert values(job)["sched"] == {
        "warmup": {"steps": 200, "start": 0.1}, "peak": 0.75, "name": "cosine"
    }  # fmt: skip

    # The same key set twice: each answer is its own change's.
    first = set_json("sched/warmup/start=0.2", "--job", job)[1]
    again = set_json("sched/warmup/start=0.2", "--job", job)[1]
    assert _parts(first) == [("sched/warmup/start", 0.1, 0.2)]
    assert _parts(again) == [("sched/warmup/start", 0.2, 0.2)]
    assert first["changes"][0]["change_id"] != again["changes"][0]["change_id"]

    # A value of several KiB never vanishes from get; one over 16 KiB is refused.
    big = {f"key{i:03}": i / 7 for i in range(300)}
    code, answer = set_json(f"aug={json.dumps(big)}", "--job", job)
    assert code == 0, answer
    wait_for(lambda: values(job)["aug"] == big, 10, what="the whole dict in get")
    huge = json.dumps({f"key{i:04}": i / 7 for i in range(2000)})
    refused = run_loomrun("set", f"aug={huge}", "--job", job)
    assert refused.returncode == 2 and "over the 16 KiB a value may take" in refused.stderr

    # A field back to the script's own value, then the whole parameter.
    code, answer = set_json_unset("sched/peak", job)
    assert code == 0 and _parts(answer) == [("sched/peak", 0.75, 1.0)], answer
    code, answer = set_json_unset("aug", job)
    assert code == 0, answer
    wait_for(lambda: values(job)["aug"] == {"p": 0.5, "x.y": 1.0}, 10, what="aug unset")

    out, err = sup.communicate(timeout=180)
    assert sup.returncode == 0, err
    assert "SAME INSTANCE" not in out and "WRONG TYPE" not in out, out
    changes = [(step, name, value) for step, name, value in seen(out) if step > 1]
    sched = [value for _, name, value in changes if name == "sched"]
    assert sched[0] == {"warmup": {"steps": 200, "start": 0.1}, "peak": 0.5, "name": "linear"}, (
        "both fields of one set at one step: never a half-updated value"
    )
    heads = [value for _, name, value in changes if name == "head"]
    assert heads == [{"steps": 9, "start": 0.1}], "the handler got its own dataclass"

    # The parameters' docs: one JSON Schema a validator takes, which the values in effect
    # at the end fit; and, with no broker to ask, the document kept next to the ledger.
    document = json.loads(run_loomrun("schema", "--job", job, "--format", "json").stdout)
    jsonschema.Draft202012Validator.check_schema(document)
    final = {name: value for name, value in values(job).items() if value is not None}
    jsonschema.Draft202012Validator(document).validate(final)
    offline = run_loomrun("schema", "--job", job, "--nats", "nats://127.0.0.1:1")
    assert offline.returncode == 0, offline.stderr
    assert "| `sched/warmup/steps` | int | min 0 | 100 | 200 |  | steps of linear warm-up |" in (
        offline.stdout
    ), offline.stdout

    log = run_loomrun("log", "--job", job, "--json")
    records = [json.loads(line) for line in log.stdout.splitlines()]
    first_record = records[0]
    assert [p["name"] for p in first_record["parts"]] == ["sched/peak", "sched/warmup/steps"]

    (hashed,) = re.findall(r"hash (\w+)", out)
    replay = run_loomrun(
        "--no-broker", "--job", job_id("again"), "--replay", job,
        SCRIPT, "--steps", "1500", "--step-time", "0", timeout=300,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    assert re.findall(r"hash (\w+)", replay.stdout) == [hashed], "bitwise, as steered"
    assert [s for s in seen(replay.stdout) if s[0] > 1] == changes, "each at its step"


def set_json_unset(name: str, job: str) -> tuple[int, dict]:
    result = run_loomrun("unset", name, "--job", job, "--json")
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout) if result.stdout else {}


@pytest.mark.slow
def test_a_restart_applies_fields_whole_values_and_unsets_in_the_order_they_were_made(procs):
    """Each field is its own desired key: a restarted worker composes them in the order of
    their revisions, so a field set after a whole value holds, and an unset after a field
    clears it."""
    job = job_id("fields-restart")
    sup = start(
        procs, SCRIPT, "--steps", "100000", "--step-time", "0.005", job=job,
        extra=("--max-restarts", "1"),
    )  # fmt: skip
    wait_ready(job, name="sched")
    for change in (
        ["sched/peak=0.5"],
        ['blocks=[{"width": 4}, {"width": 4}]'],
        ["blocks/1/width=6"],
        ["aug/q=1"],
        ["sched/warmup/steps=20"],
        ['sched={"peak": 0.25}'],
        ["sched/name=cosine"],
    ):
        code, answer = set_json(*change, "--job", job)
        assert code == 0, answer
    code, answer = set_json_unset("aug", job)
    assert code == 0, answer
    expected = values(job)
    assert expected["blocks"] == [{"width": 4}, {"width": 6}] and "q" not in expected["aug"]
    assert expected["sched"] == {
        "warmup": {"steps": 100, "start": 0.1},
        "peak": 0.25,
        "name": "cosine",
    }, "the whole value replaced the fields set before it; the field after it holds"
    worker = _pid(job)
    os.kill(worker, signal.SIGKILL)
    wait_for(
        lambda: _pid(job) not in (worker, None, 0) and 5 < steps_seen(job) < 1000, 60,
        what="the restarted worker's first steps",
    )  # fmt: skip
    sup.send_signal(signal.SIGINT)
    out, err = sup.communicate(timeout=60)
    assert "restarting all replicas (restart 1/1)" in err, err
    restarted = out[out.rindex("seen 1 sched") :]
    for name in ("sched", "blocks", "aug"):
        assert f"seen 1 {name} {json.dumps(expected[name], sort_keys=True)}" in restarted, (
            f"the restarted worker has {name} as it was, from its first step"
        )


def _pid(job: str) -> int | None:
    got = json.loads(run_loomrun("watch", "--once", "--json", "--job", job).stdout)
    replicas = [r for j in got.get("jobs", []) for r in j["replicas"]]
    return replicas[0]["pid"] if replicas else None
