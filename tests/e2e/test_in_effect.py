"""'Applied' means in effect, on the scripts people run: a nanoGPT-style loop that writes
its own lr every step (2 ranks on gloo), the Hugging Face Trainer (2 replicas, one gloo
group through accelerate), Lightning with a step-interval scheduler, a model under
torch.compile, and an optimizer that writes lr in its own step (which loomrun cannot
follow, and says so). Real processes, a real broker, steered through the CLI.

Each script prints the lr every optimizer step ran with (`stepped N LR ...`, from a global
step post-hook), which is what these tests check against the script's own schedule. The
long runs end when the test sets their declared `stop`, so no change can come too late."""

from __future__ import annotations

import json
import math
import re
import signal

import pytest
from conftest import SCRIPTS, run_loomrun, wait_for
from jobs import cli_json, job_id, one_step, start, wait_ready

from loomrun.broker.state import state_dir


def stepped(out: str, replica: str = "r0") -> dict[int, list[float]]:
    pattern = rf"^\[{replica}\] stepped (\d+) (.+)$"
    return {int(m[1]): [float(x) for x in m[2].split()] for m in re.finditer(pattern, out, re.M)}


def seen(out_file, replica: str = "r0") -> int:
    """The last step `replica` printed so far (the script's stdout goes to a file)."""
    found = stepped(out_file.read_text(), replica)
    return max(found, default=0)


def metric_points(job: str) -> list[dict]:
    result = run_loomrun("log", "--metrics", "--json", "--job", job)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def check_points(points: list[dict], rank: str, start: int, end: int, want) -> None:
    """Every metric point of `rank` from step `start` to `end` shows lr within 1% of
    `want(step)`: what the step it was taken at ran with."""
    shown = [p for p in points if p["replica"] == rank and start <= p["step"] < end]
    assert shown, f"metric points of {rank} between steps {start} and {end}"
    for point in shown:
        assert point["lr"] == pytest.approx(want(point["step"]), rel=0.01), point


def hold_then_stop(job: str, sup, out, ranks, change: str) -> tuple[int, list[dict], int]:
    """`set CHANGE --hold`, some steps, the metric points while it runs (from the
    supervisor), then `set stop=true`: the step of the hold, the points, the last step."""
    code, held = cli_json("set", change, "--hold", "--job", job)
    assert code == 0 and {c["kind"] for c in held["changes"]} == {"hold"}, held
    at_hold = one_step(held)
    wait_steps(out, at_hold, 20, ranks)
    points = metric_points(job)
    code, stopped = cli_json("set", "stop=true", "--job", job)
    assert code == 0, stopped
    last = one_step(stopped)
    sup.wait(timeout=300)
    assert sup.returncode == 0
    return at_hold, points, last


def nanogpt_lr(it: int) -> float:
    """tests/scripts/nanogpt_style.py's schedule."""
    top, bottom, warmup, decay = 6e-3, 6e-4, 20, 800
    if it < warmup:
        return top * (it + 1) / (warmup + 1)
    if it > decay:
        return bottom
    ratio = (it - warmup) / (decay - warmup)
    return bottom + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (top - bottom)


def run_to_file(procs, tmp_path, name, script, *args, replicas=1, extra=()):
    """A job whose output goes to a file the test can read while it runs."""
    out = tmp_path / f"{name}.out"
    job = job_id(name)
    with out.open("w") as sink:
        sup = procs.start("--replicas", replicas, "--job", job, *extra, script, *args, stdout=sink)
    return job, sup, out


def wait_steps(out, after: int, more: int, replicas=("r0",), timeout=120) -> None:
    wait_for(
        lambda: all(seen(out, r) >= after + more for r in replicas),
        timeout,
        what=f"{more} more steps after {after}",
    )


@pytest.mark.slow
def test_a_nanogpt_style_loop_keeps_set_unset_and_hold_on_both_ranks(procs, tmp_path):
    job, sup, out = run_to_file(
        procs, tmp_path, "nanogpt", SCRIPTS / "nanogpt_style.py", "--step-time", "0.004",
        replicas=2,
    )  # fmt: skip
    ranks = ("r0", "r1")
    wait_ready(job, ranks)
    wait_steps(out, 40, 0, ranks)

    code, scaled = cli_json("set", "lr=0.002", "--job", job)
    assert code == 0 and scaled["result"] == "applied", scaled
    at_set = one_step(scaled)
    k = 0.002 / nanogpt_lr(at_set - 1)
    assert scaled["changes"][0]["old"] == pytest.approx(nanogpt_lr(at_set - 1))
    wait_steps(out, at_set, 80, ranks)
    listed = json.loads(run_loomrun("get", "--job", job, "--json").stdout)["params"]
    lr = {p["replica"]: p for p in listed if p["name"] == "lr"}
    for rank in ranks:
        assert lr[rank]["steered"] and not lr[rank]["held"]
        now = lr[rank]["own"]  # the script's own lr now: on its schedule, not its first value
        assert nanogpt_lr(at_set + 60) > now > nanogpt_lr(899)
        assert lr[rank]["value"] == pytest.approx(k * now, rel=1e-9)

    code, unset = cli_json("unset", "lr", "--job", job)
    assert code == 0 and {c["kind"] for c in unset["changes"]} == {"unset"}, unset
    at_unset = one_step(unset)
    wait_steps(out, at_unset, 60, ranks)
    at_hold, points, last = hold_then_stop(job, sup, out, ranks, "lr=0.001")

    text = out.read_text()
    for rank in ranks:
        used = stepped(text, rank)
        assert sorted(used) == list(range(1, last + 1)), "it stopped where it was told, on each"
        for step, lrs in used.items():
            schedule = nanogpt_lr(step - 1)
            if at_set <= step < at_unset:
                want = k * schedule
            elif at_hold <= step:
                want = 0.001
            else:
                want = schedule
            assert lrs == pytest.approx([want, want], rel=1e-12), (rank, step)
        assert all(used[s][0] == 0.001 for s in range(at_hold, last + 1)), "held exactly"
        check_points(points, rank, at_set + 20, at_unset, lambda step: k * nanogpt_lr(step - 1))
    hashes = set(re.findall(r"hash (\w+)", text))
    assert len(hashes) == 1, "the ranks are bitwise identical"

    records = [json.loads(line) for line in (state_dir() / "jobs" / job / "changes.jsonl").open()]
    kinds = [(r["replica"], r["kind"], r["outcome"], r["step"]) for r in records]
    for rank in ranks:
        assert [k for k in kinds if k[0] == rank] == [
            (rank, "set", "applied", at_set),
            (rank, "unset", "applied", at_unset),
            (rank, "hold", "applied", at_hold),
            (rank, "set", "applied", last),
        ]
    again = run_loomrun(
        "--replicas", "2", "--no-broker", "--job", job_id("replayed"), "--replay", job,
        SCRIPTS / "nanogpt_style.py", timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert set(re.findall(r"hash (\w+)", again.stdout)) == hashes, "the replay, bitwise"


@pytest.mark.slow
def test_the_hugging_face_trainer_keeps_the_scaled_schedule_and_logs_it(procs, tmp_path):
    job, sup, out = run_to_file(
        procs, tmp_path, "trainer", SCRIPTS / "hf_trainer.py", "--max-steps", "3000", replicas=2
    )
    ranks = ("r0", "r1")
    wait_ready(job, ranks, timeout=120)
    wait_steps(out, 30, 0, ranks)

    def linear(step: int) -> float:  # the Trainer's linear warm-up schedule, for step N
        t = step - 1
        return 5e-3 * (t / 10 if t < 10 else max(0.0, (3000 - t) / 2990))

    code, scaled = cli_json("set", "lr=0.001", "--job", job)
    assert code == 0 and scaled["result"] == "applied", scaled
    at_set = one_step(scaled)
    k = 0.001 / linear(at_set)
    wait_steps(out, at_set, 60, ranks)
    code, unset = cli_json("unset", "lr", "--job", job)
    assert code == 0, unset
    at_unset = one_step(unset)
    wait_steps(out, at_unset, 40, ranks)
    at_hold, points, last = hold_then_stop(job, sup, out, ranks, "lr=0.0005")

    text = out.read_text()
    assert len(set(re.findall(r"hash (\w+)", text))) == 1, "the ranks are bitwise identical"
    for rank in ranks:
        used = {s: lrs[0] for s, lrs in stepped(text, rank).items()}
        logged = {
            int(m[1]): float(m[2])
            for m in re.finditer(rf"^\[{rank}\] logged (\d+) (\S+)$", text, re.M)
        }
        assert sorted(used) == list(range(1, last + 1)), "it stopped at that step, on each"
        for step, lr in used.items():
            if at_set <= step < at_unset:
                want = k * linear(step)
            elif at_hold <= step:
                want = 0.0005
            else:
                want = linear(step)
            assert lr == pytest.approx(want, rel=1e-9, abs=1e-15), (rank, step)
        for step in range(at_set, at_unset):
            assert logged[step] == pytest.approx(k * linear(step), rel=1e-9), (
                "the Trainer's own logged learning_rate is the scaled one",
                rank,
                step,
            )
        assert logged[at_hold + 5] == 0.0005
        check_points(points, rank, at_set + 20, at_unset, lambda step: k * linear(step))


@pytest.mark.slow
def test_lightning_with_a_step_interval_scheduler(procs, tmp_path):
    # Steps enough that the job is still running when the change lands on a loaded machine.
    job, sup, out = run_to_file(
        procs, tmp_path, "lightning", SCRIPTS / "lightning_schedule.py", "3000"
    )
    wait_ready(job, timeout=120)
    wait_steps(out, 20, 0)
    schedule = lambda step: 0.05 / (1.0 + 0.01 * (step - 1))  # noqa: E731
    code, scaled = cli_json("set", "lr=0.01", "--job", job)
    assert code == 0, scaled
    at_set = one_step(scaled)
    k = 0.01 / schedule(at_set)
    sup.wait(timeout=120)
    assert sup.returncode == 0
    used = stepped(out.read_text())
    assert len(used) == 3000
    for step, (lr,) in used.items():
        want = k * schedule(step) if step >= at_set else schedule(step)
        assert lr == pytest.approx(want, rel=1e-9), step


@pytest.mark.slow
def test_a_model_under_torch_compile_steps_and_changes_as_without_it(procs, tmp_path):
    job, sup, out = run_to_file(procs, tmp_path, "compiled", SCRIPTS / "compiled.py", "600")
    wait_ready(job, timeout=180)
    wait_steps(out, 20, 0, timeout=180)
    code, scaled = cli_json("set", "lr=0.1", "--job", job)
    assert code == 0, scaled
    at_set = one_step(scaled)
    schedule = lambda step: 0.05 / (1.0 + 0.01 * (step - 1))  # noqa: E731
    k = 0.1 / schedule(at_set)
    sup.wait(timeout=180)
    assert sup.returncode == 0
    used = stepped(out.read_text())
    assert len(used) == 600
    assert all(
        lr == pytest.approx(k * schedule(s) if s >= at_set else schedule(s), rel=1e-9)
        for s, (lr,) in used.items()
    )


def test_an_optimizer_that_writes_lr_in_its_step_is_never_applied(procs):
    job = job_id("ownlr")
    start(procs, SCRIPTS / "own_lr.py", job=job)
    wait_ready(job)
    code, held = cli_json("set", "lr=0.05", "--job", job)
    assert code == 0 and held["changes"][0]["state"] == "applied", held
    first = held["changes"][0]["change_id"]
    refused = run_loomrun("set", "own_lr=true", "--hold", "--job", job)
    assert refused.returncode == 2 and "--hold is for lr and lr.N" in refused.stderr
    assert run_loomrun("set", "own_lr=true", "--job", job).returncode == 0

    def records():
        return [
            json.loads(line)
            for line in run_loomrun("log", "--job", job, "--json").stdout.splitlines()
        ]

    ended = wait_for(
        lambda: [r for r in records() if r["outcome"] == "overridden"], 30, what="the record"
    )
    assert ended[0]["change_id"] == first and ended[0]["ended"] and ended[0]["new"] == 0.25
    assert "wrote lr=0.25 over it" in ended[0]["reason"]
    listed = json.loads(run_loomrun("get", "--job", job, "--json").stdout)["params"]
    lr = next(p for p in listed if p["name"] == "lr")
    assert lr["value"] == 0.25 and not lr["steered"], "the value actually in effect"

    again = run_loomrun("set", "lr=0.02", "--job", job)
    assert again.returncode == 1, again.stdout + again.stderr
    assert re.search(
        r"r0  lr overridden at step \d+, not in effect: the optimizer's own step", again.stdout
    )
    assert "wrote lr=0.25" in again.stdout
    events = run_loomrun("watch", "--once", "--json", "--job", job)
    kinds = [e["kind"] for e in json.loads(events.stdout)["events"]]
    assert kinds.count("overridden") == 2, kinds


def test_a_replica_that_is_not_running_answers_nothing_and_set_says_how_it_ended(procs):
    job = job_id("ended")
    sup = start(
        procs, SCRIPTS / "steered.py", "--steps", "100000", "--quiet", "--stop-rank", "1",
        "--stop-at", "30", job=job, replicas=2,
    )  # fmt: skip
    wait_ready(job, ("r0", "r1"))

    def r1_exited():
        listed = json.loads(run_loomrun("watch", "--once", "--json", "--job", job).stdout)
        rows = {r["replica"]: r for r in listed["jobs"][0]["replicas"]}
        return rows.get("r1", {}).get("state", "").startswith("exited")

    wait_for(r1_exited, 60, what="r1 to exit")
    for _ in range(2):  # the same key set twice: each answer its own, never a stale one
        code, answer = cli_json("set", "lr=0.03", "--job", job)
        assert code == 1, answer
        states = {c["replica"]: (c["state"], c.get("reason")) for c in answer["changes"]}
        assert states["r0"][0] == "applied"
        assert states["r1"] == ("not running", "not running: exited 0 at step 30")
    plain = run_loomrun("set", "lr=0.04", "--replica", "r1", "--job", job)
    assert plain.returncode == 1
    assert plain.stdout.strip() == "r1  lr not sent: r1 is not running (exited 0 at step 30)"
    assert sup.poll() is None
    sup.send_signal(signal.SIGTERM)
