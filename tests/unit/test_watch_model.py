"""`watch`'s model of the jobs, fed in process."""

from __future__ import annotations

import pytest

from loomrun._proto import loomrun_pb2 as pb
from loomrun.watch import WatchModel, describe_state, render_plain


def status_of(replica="r0", state="running", step=10, age=0.0, now=1000.0, code=0, **metrics):
    status = pb.ReplicaStatus(
        job="j", replica=replica, host="h", state=pb.ReplicaState.Value(state.upper()),
        exit_code=code, time=now - age,
    )  # fmt: skip
    status.status.step = step
    status.status.steps_per_sec = 5.0
    status.status.metrics.update(metrics)
    return status


@pytest.mark.parametrize(
    "state, age, code, lost, shown",
    [
        ("running", 0.5, 0, False, "running"),
        ("running", 10.0, 0, False, "stale"),
        ("paused", 0.5, 0, False, "paused"),
        ("exited", 100.0, 0, False, "exited 0"),
        ("failed", 100.0, 3, False, "failed: 3"),
        ("failed", 1.0, 137, False, "failed: SIGKILL"),
        ("running", 0.5, 0, True, "lost"),
    ],
)
def test_describe_state(state, age, code, lost, shown):
    assert describe_state(status_of(state=state, code=code), age, lost) == shown


def test_model_snapshot_groups_by_job_and_hides_old_finished_jobs():
    model = WatchModel()
    now = 1000.0
    running = pb.JobInfo(job="j", host="h", replicas=["r0", "r1"], started=900, heartbeat=999)
    model.take_job("j.n0", running.SerializeToString())
    done = pb.JobInfo(job="old", started=100, heartbeat=200, finished=300, exit_code=0)
    model.take_job("old.n0", done.SerializeToString())
    for replica in ("r1", "r0"):
        model.take_status(f"j.{replica}", status_of(replica, loss=0.5, acc=0.9).SerializeToString())
    model.take_status("j.r9", b"\xff not protobuf")
    snap = model.snapshot(now)
    assert [j["job"] for j in snap["jobs"]] == ["j"]
    assert [r["replica"] for r in snap["jobs"][0]["replicas"]] == ["r0", "r1"]
    assert snap["metrics"] == ["loss", "acc"]
    assert snap["jobs"][0]["totals"] == {"replicas": 2, "running": 2, "steps_per_sec": 10.0}
    assert model.snapshot(now, job="old")["jobs"][0]["state"] == "exited 0"
    text = render_plain(snap)
    assert "r0" in text and "0.5" in text and "\x1b" not in text


def test_events_of_an_earlier_run_of_the_job_id_stay_out():
    model = WatchModel()
    this_run = pb.JobInfo(job="j", host="h", replicas=["r0"], started=900, heartbeat=999)
    model.take_job("j.n0", this_run.SerializeToString())
    status = status_of("r0", loss=0.5)
    status.job = "j"
    model.take_status("j.r0", status.SerializeToString())
    earlier = [
        pb.Event(job="j", replica="r0", kind="failed", text="exited 1", time=500),
        pb.Event(job="j", replica="r0", kind="applied", text="lr 0.1 -> 0.2 at step 3", time=510),
    ]
    ours = pb.Event(job="j", replica="r0", kind="started", text="pid 7", time=901)
    for event in [*earlier, ours]:
        model.take_event(event.SerializeToString())
    snap = model.snapshot(1000.0)
    assert [e["kind"] for e in snap["events"]] == ["started"]
    assert snap["jobs"][0]["replicas"][0]["last_change"] is None, "not this run's change"
    change = pb.Event(job="j", replica="r0", kind="applied", text="lr 0.1 -> 0.3", time=950)
    model.take_event(change.SerializeToString())
    assert model.snapshot(1000.0)["jobs"][0]["replicas"][0]["last_change"] == "lr 0.1 -> 0.3"
