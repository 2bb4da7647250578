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
import tracemalloc

import pytest
from conftest import SCRIPTS, run_loomrun, wait_for
from jobs import job_id, start, wait_ready

from loomrun.broker.state import state_dir
from loomrun.control import history
from loomrun.launch import free_port


def test_memory_per_replica_at_the_limit():
    tracemalloc.start()
    series = history.Series()
    for step in range(1, 10 * history.POINTS):
        series.add(step, float(step), {"loss": 1.0, "lr": 0.1, "steps_per_sec": 10.0})
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(series.steps) <= history.POINTS
    assert used <= 100 * 1024, f"{used} bytes for one replica's series of 3 metrics"


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
