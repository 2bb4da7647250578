"""`loomrun copy` on a running job of independent replicas (tests/scripts/spiky.py
--independent: each replica seeded by its rank, BatchNorm, momentum, a warm-up schedule),
as a user runs it: the target's parameters after the copy are bitwise the source's at the
step it shared them, through shared memory and through the broker's object store; the
values given beside it are in effect from the copy on; each answer is its own (the same
copy twice, from two sources); bad requests are one line and exit 2; a state over the
object store's budget is refused and the job trains on; no segment is left behind."""

from __future__ import annotations

import os

from conftest import run_loomrun
from jobs import cli_json, wait_ready
from spiky_runs import at_least, hashes, run_to_file

from loomrun.mailbox import SHM_DIR


def stop(job: str, sup) -> None:
    """Every replica ends, each at its own step (they are independent)."""
    code, stopped = cli_json("set", "stop=true", "--job", job)
    assert code == 0, stopped
    assert sup.wait(timeout=120) == 0


def copied(answer: dict) -> dict[str, dict]:
    """Each change of a copy's answer by its name (share, copy, or a value's)."""
    return {c["name"]: c for c in answer["changes"]}


def copies_left(job: str) -> list[str]:
    return [p.name for p in SHM_DIR.glob(f"loomrun-{os.getuid()}-{job}-copy-*")]


def check_copy(text: str, answer: dict, source: str, target: str, via: str) -> int:
    """The target's parameters, from the step after the copy, are the source's at the
    step it shared them; its scheduler is at the source's count. Returns the copy's step."""
    found = copied(answer)
    share, copy = found["share"], found["copy"]
    assert share["replica"] == source and copy["replica"] == target, answer
    assert share["state"] == copy["state"] == "applied", answer
    assert share["new"]["via"] == via and share["new"]["bytes"] == copy["new"]["bytes"] > 1000
    taken, at = share["step"], copy["step"]
    assert copy["new"]["from"] == source and copy["new"]["step"] == taken, copy
    params = hashes(text, target, "params")
    assert params[at + 1] == hashes(text, source, "params")[taken], "bitwise the source's"
    assert params[at] != params[at + 1], "it was another model before"
    sched = hashes(text, target, "sched")
    assert sched[at + 1] == hashes(text, source, "sched")[taken], "at the source's count"
    return at


def test_copy_gives_a_replica_anothers_state_through_shm_and_the_object_store(procs, tmp_path):
    job, sup, out = run_to_file(
        procs, tmp_path, "copy", "--independent", "--step-time", "0.01", replicas=3
    )
    wait_ready(job, ("r0", "r1", "r2"))
    at_least(out, 30, ("r0", "r1", "r2"))

    code, first = cli_json("copy", "r2", "--from", "r0", "lr=0.005", "--job", job)
    assert code == 0 and first["result"] == "applied", first
    lr = copied(first)["lr"]
    assert (lr["replica"], lr["state"], lr["new"]) == ("r2", "applied", 0.005), lr

    # The same target again, from another source, through the object store: every answer
    # is this request's (its step, its source), never the first one's.
    code, second = cli_json("copy", "r2", "--from", "r1", "--via", "store", "--job", job)
    assert code == 0, second
    assert copied(second)["share"]["new"]["object"].endswith(
        copied(second)["share"]["new"]["token"]
    )
    assert copies_left(job) == [], "each segment goes once read"
    last = max(copied(second)["copy"]["step"], copied(first)["copy"]["step"])
    at_least(out, last + 2, ("r2",))
    text = out.read_text()
    at = check_copy(text, first, "r0", "r2", "shm")
    again = check_copy(text, second, "r1", "r2", "store")
    assert again > at and copied(second)["share"]["step"] != copied(first)["share"]["step"]
    lrs = hashes(text, "r2", "lr")
    assert float(lrs[at + 1]) == float(lrs[again + 1]) == 0.005, "its own value stays"
    source = hashes(text, "r1", "lr")
    assert float(source[max(source)]) == 0.02, "the source keeps its own"

    # Two targets in one command: each its own share, one after another.
    code, both = cli_json("copy", "r1", "r2", "--from", "r0", "--job", job)
    assert code == 0, both
    shares = [c for c in both["changes"] if c["name"] == "share"]
    assert [c["new"]["target"] for c in shares] == ["r1", "r2"], both
    into = {c["replica"]: c for c in both["changes"] if c["name"] == "copy"}
    at_least(out, max(c["step"] for c in into.values()) + 2, ("r1", "r2"))
    text = out.read_text()
    for share in shares:
        target = share["new"]["target"]
        check_copy(text, {"changes": [share, into[target]]}, "r0", target, "shm")
    assert copies_left(job) == []

    log = run_loomrun("log", "--job", job)
    assert f"copied r0's state of step {copied(first)['share']['step']}" in log.stdout, log.stdout
    stop(job, sup)
    assert copies_left(job) == []


def test_a_copy_refused_is_one_line_and_the_job_trains_on(procs, tmp_path):
    job, sup, out = run_to_file(
        procs, tmp_path, "copy-bad", "--independent", "--step-time", "0.01", replicas=2,
        env={"LOOMRUN_COPY_STORE_BYTES": "2K"},
    )  # fmt: skip
    wait_ready(job, ("r0", "r1"))
    code, refused = cli_json("copy", "r1", "--from", "r0", "--via", "store", "--job", job)
    share = copied(refused)["share"]
    assert code == 1 and share["state"] == "rejected" and "copy" not in copied(refused)
    assert (
        "more than 2.0 KB (the object store's budget, LOOMRUN_COPY_STORE_BYTES)"
        in (share["reason"])
    ), share
    for args, said in [
        (("r1", "--from", "r1"), "r1 cannot copy its own state"),
        (("r7", "--from", "r0"), "has no replica 'r7'"),
        (("r1", "--from", "r0", "nope=1"), "nope"),
        (("r1", "--from", "r0", "lr=fast"), "lr"),
    ]:
        bad = run_loomrun("copy", *args, "--job", job)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and said in lines[-1] and "Traceback" not in bad.stderr, (
            args, bad.stderr,
        )  # fmt: skip
    step = max(hashes(out.read_text(), "r1"))
    at_least(out, step + 20, ("r0", "r1"))
    assert copies_left(job) == []
    stop(job, sup)
