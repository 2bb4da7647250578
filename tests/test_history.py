"""The metric history: bounded series that keep a run's whole shape, served by the
supervisor over the broker while the job runs and read from disk after it; and the loss of
a script that reports none itself, taken from what it calls `.backward()` on."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import threading
import time
import tracemalloc

import pytest
from conftest import SCRIPTS, run_loomrun, wait_for
from test_control import job_id, start, wait_ready

from loomrun._proto import loomrun_pb2 as pb
from loomrun.broker.state import state_dir
from loomrun.control import history
from loomrun.launch import free_port


def test_a_full_series_keeps_the_whole_run_evenly():
    series = history.Series(limit=64)
    for step in range(1, 100_001):
        series.add(step, float(step), {"loss": 1.0 / step})
    steps = list(series.steps)
    assert 32 <= len(steps) <= 64
    assert steps[0] == 1 and steps[-1] > 100_000 - 2 * series.spacing
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert max(gaps) <= 2 * min(gaps), gaps  # evenly spread, not dense at the end
    assert list(series.columns["loss"]) == [1.0 / s for s in steps]


def test_metrics_that_come_late_are_padded_and_too_many_are_left_out():
    series = history.Series(limit=16)
    series.add(1, 1.0, {"loss": 0.5})
    series.add(1, 1.1, {"loss": 0.4})  # the same step again: not a point
    series.add(2, 2.0, {"loss": 0.3, "acc": 0.9})
    series.add(1, 3.0, {"acc": 0.8})  # a restart from an earlier step
    columns = history.series_dict(series.to_pb("j", "r0"))
    assert columns == {
        "step": [1, 2, 1], "time": [1.0, 2.0, 3.0],
        "loss": [0.5, 0.3, None], "acc": [None, 0.9, 0.8],
    }  # fmt: skip
    crowded = history.Series()
    crowded.add(1, 1.0, {f"m{i}": float(i) for i in range(history.COLUMNS + 5)})
    assert len(crowded.columns) == history.COLUMNS and crowded.left_out == 5


def test_a_reported_nan_or_infinity_is_not_a_missing_value():
    series = history.Series(limit=16)
    series.add(1, 1.0, {"loss": 0.5})
    series.add(2, 2.0, {"loss": math.nan, "acc": math.inf})
    series.add(3, 3.0, {"loss": -math.inf})
    columns = history.series_dict(pb.MetricSeries.FromString(
        series.to_pb("j", "r0").SerializeToString()
    ))  # fmt: skip
    assert columns["loss"] == [0.5, "nan", "-inf"] and columns["acc"] == [None, "inf", None]
    text = json.dumps(columns, allow_nan=False)  # valid JSON, no NaN nor Infinity
    assert [p.get("loss") for p in history.points("r0", json.loads(text))] == [0.5, "nan", "-inf"]


def test_an_odd_limit_keeps_the_newest_point():
    series = history.Series(limit=17)
    for step in range(1, 200):
        series.add(step, float(step), {})
        assert series.steps[-1] == step or step - series.steps[-1] < series.spacing


def test_memory_per_replica_at_the_limit():
    tracemalloc.start()
    series = history.Series()
    for step in range(1, 10 * history.POINTS):
        series.add(step, float(step), {"loss": 1.0, "lr": 0.1, "steps_per_sec": 10.0})
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(series.steps) <= history.POINTS
    assert used <= 100 * 1024, f"{used} bytes for one replica's series of 3 metrics"


def test_a_series_too_large_for_a_message_is_thinned_to_fit():
    kept = history.History("j", ["r0"], limit=history.POINTS)
    for step in range(1, history.POINTS + 1):
        kept.add("r0", pb.Status(step=step, time=step, metrics={f"m{i}": 1.0 for i in range(30)}))
    whole = kept.wire("r0", 10**7)
    small = kept.wire("r0", len(whole) // 3)
    assert len(small) <= len(whole) // 3
    assert len(pb.MetricSeries.FromString(small).steps) >= history.POINTS // 4


def test_points_of_a_hand_edited_file_keep_only_what_fits():
    assert history.points("r0", {"step": "x"}) == []
    assert history.points("r0", {"step": [1, 2], "time": [1.0]}) == []
    columns = {"step": [1, None, True, 2], "time": [1.0, 2.0, 3.0, 1e400],
               "loss": ["x", 1, 1, 1], "acc": [True, 1, 1, 1], "lr": [0.1, 1, 1, 1]}  # fmt: skip
    assert history.points("r0", columns) == [{"replica": "r0", "step": 1, "time": 1.0, "lr": 0.1}]


def test_an_earlier_runs_files_are_set_aside(tmp_path):
    from loomrun.control.ledger import read_files, set_aside_earlier

    for name in ("metrics.json", "metrics.node1.json"):
        (tmp_path / name).write_text('{"replicas": {"r1": {"step": [1], "time": [1.0]}}}')
    for name in ("changes.jsonl", "changes.node1.jsonl"):
        (tmp_path / name).write_text('{"replica": "r1", "time": 1.0}\n')
    set_aside_earlier(tmp_path, time.time() + 1)
    assert history.read_files(tmp_path) == {} and read_files(tmp_path) is None
    assert len(list(tmp_path.glob("metrics*-*.json"))) == 2
    assert len(list(tmp_path.glob("changes*-*.jsonl"))) == 2
    kept = history.History("j", ["r0"])
    kept.add("r0", pb.Status(step=1, time=1.0, metrics={"loss": 2.0}))
    assert kept.write([tmp_path], "metrics.json") == []
    assert history.read_files(tmp_path)["r0"]["loss"] == [2.0]
    assert kept.write([tmp_path / "missing"], "metrics.json")[0].startswith("cannot write")


def test_reserved_names_are_not_metrics():
    status = pb.Status(step=3, steps_per_sec=2.0, metrics={"loss": 1.0, "step": 9.0})
    status.values["lr"].f = 0.5
    assert history.status_values(status) == {"loss": 1.0, "lr": 0.5, "steps_per_sec": 2.0}


def metric_points(*args) -> list[dict]:
    result = run_loomrun("log", "--metrics", "--json", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def drain(proc: subprocess.Popen) -> list[str]:
    """The job's output, read as it comes (a full pipe would hold its workers back)."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return lines


@pytest.mark.slow
def test_history_of_a_zero_code_script_mid_run_and_after_it(procs, tmp_path):
    """A script without a loomrun import, scaling its loss with a GradScaler: its loss is
    the unscaled one of the very step; lr and steps/s are in the history; a client that
    connects mid-run gets the series; after the job, the same from disk."""
    job = job_id("history")
    sup = start(
        procs, SCRIPTS / "plain_train.py", "--amp", job=job, replicas=2,
        extra=("--log-dir", tmp_path), env={"LOOMRUN_HISTORY_POINTS": "16"},
    )  # fmt: skip
    output = drain(sup)
    wait_ready(job, ("r0", "r1"))
    assert run_loomrun("set", "lr=0.02", "--replica", "r1", "--job", job).returncode == 0

    def steered():
        points = metric_points("--job", job)
        r1 = [p for p in points if p["replica"] == "r1"]
        return points if r1 and r1[-1].get("lr") == 0.02 and r1[-1]["step"] > 100 else None

    points = wait_for(steered, 60, interval=0.5, what="lr 0.02 in r1's history past step 100")
    for replica in ("r0", "r1"):
        mine = [p for p in points if p["replica"] == replica]
        assert 2 <= len(mine) <= 16, mine
        assert mine[0]["step"] < 50, "the start of the run is kept when the series thins"
        assert all("loss" in p and "steps_per_sec" in p for p in mine), mine
    assert all(p["lr"] == 0.01 for p in points if p["replica"] == "r0")
    printed = {}
    for line in list(output):
        if found := re.fullmatch(r"\[(r\d)\] loss (\d+) (\S+)\n", line):
            printed[(found[1], int(found[2]))] = float(found[3])
    for p in points:
        if (p["replica"], p["step"]) in printed:
            assert math.isclose(p["loss"], printed[(p["replica"], p["step"])], rel_tol=1e-6), p
    matched = [p for p in points if (p["replica"], p["step"]) in printed]
    assert len(matched) >= len(points) - 2, "every point's loss is that step's loss"

    sup.terminate()
    sup.communicate(timeout=60)
    nobroker = f"nats://127.0.0.1:{free_port()}"
    after = metric_points("--job", job, "--nats", nobroker)
    for replica in ("r0", "r1"):
        before = [p for p in points if p["replica"] == replica]
        mine = [p for p in after if p["replica"] == replica]
        assert 2 <= len(mine) <= 16 and mine[0]["step"] < 50, mine
        assert mine[-1]["step"] >= before[-1]["step"], "the whole run, to its end"
    for folder in (state_dir() / "jobs" / job, tmp_path / job):
        written = json.loads((folder / "metrics.json").read_text())
        assert written["limit"] == 16 and set(written["replicas"]) == {"r0", "r1"}
    only_r1 = metric_points("--job", job, "--nats", nobroker, "--replica", "r1")
    assert only_r1 and {p["replica"] for p in only_r1} == {"r1"}


def test_a_hand_edited_history_file_is_read_without_a_traceback():
    job = job_id("edited")
    folder = state_dir() / "jobs" / job
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"replicas": {
        "r0": {"step": [1, None, 3], "time": [1.0, 2.0, 3.0], "loss": [0.5, 0.4, "nan"]},
        "r1": "not a series", "r2": {"step": [1e400]},
    }}))  # fmt: skip
    nobroker = f"nats://127.0.0.1:{free_port()}"
    result = run_loomrun("log", "--metrics", "--job", job, "--nats", nobroker)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert [line.split()[:3] for line in result.stdout.splitlines()[1:]] == [
        ["r0", "1", "0.5"], ["r0", "3", "nan"]
    ]  # fmt: skip


def test_no_history_is_one_line():
    result = run_loomrun("log", "--metrics", "--job", "never-ran-here",
                         "--nats", f"nats://127.0.0.1:{free_port()}")  # fmt: skip
    assert result.returncode == 2
    assert "no metric history for job 'never-ran-here'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_lightning_changes_land_and_go_to_the_trainers_logger(procs, tmp_path):
    """Changes through the CLI land at batch boundaries; the trainer's metrics and the loss
    it calls backward on are reported; each applied change is in the trainer's logger at
    the step it took effect."""
    pytest.importorskip("lightning")
    job = job_id("lightning")
    sup = start(procs, SCRIPTS / "lightning_train.py", "--csv", tmp_path, job=job)
    wait_ready(job, name="dropout", timeout=120)
    applied = {}
    for change in ("lr=0.01", "dropout=0.25"):
        result = run_loomrun("set", change, "--job", job, "--json")
        assert result.returncode == 0, result.stderr
        (answer,) = json.loads(result.stdout)["changes"]
        applied[answer["name"]] = answer["step"]
    wait_for(
        lambda: any({"train_loss", "loss"} <= set(p) for p in metric_points("--job", job)), 30,
        interval=0.5, what="train_loss and loss in the history",
    )  # fmt: skip
    out, err = sup.communicate(timeout=180)
    assert sup.returncode == 0, err
    assert "dropout -> 0.25" in out
    assert "epoch 29 lr 0.01 dropout 0.25" in out
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {
        (key, float(row[key]), int(row["step"]))
        for row in rows for key in ("loomrun/lr", "loomrun/dropout") if row.get(key)
    }  # fmt: skip
    # Lightning's global step counts optimizer steps from 0; loomrun's steps count from 1.
    assert logged == {
        ("loomrun/lr", 0.01, applied["lr"] - 1), ("loomrun/dropout", 0.25, applied["dropout"] - 1)
    }  # fmt: skip


def test_a_node_sets_aside_its_own_earlier_files_never_another_nodes(tmp_path):
    """Nodes sharing a folder start at their own times: node 1, starting late, must not move
    node 0's live ledger; node 0 moves its own, and those of ranks this run does not have."""
    from loomrun.control.ledger import set_aside_earlier

    for name in ("changes.jsonl", "changes.node1.jsonl", "changes.node2.jsonl", "metrics.json"):
        (tmp_path / name).write_text('{"replica": "r1", "time": 1.0}\n')
    later = time.time() + 1
    set_aside_earlier(tmp_path, later, node_rank=1, nnodes=2)
    left = sorted(p.name for p in tmp_path.glob("*.json*") if "-" not in p.name)
    assert left == ["changes.jsonl", "changes.node2.jsonl", "metrics.json"]
    set_aside_earlier(tmp_path, later, node_rank=0, nnodes=2)
    assert not [p for p in tmp_path.glob("*.json*") if "-" not in p.name]
