"""The metric history's series and files, in process."""

from __future__ import annotations

import json
import math
import time

from loomrun import records
from loomrun._proto import loomrun_pb2 as pb
from loomrun.control import history


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
    columns = records.series_dict(series.to_pb("j", "r0"))
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
    columns = records.series_dict(pb.MetricSeries.FromString(
        series.to_pb("j", "r0").SerializeToString()
    ))  # fmt: skip
    assert columns["loss"] == [0.5, "nan", "-inf"] and columns["acc"] == [None, "inf", None]
    text = json.dumps(columns, allow_nan=False)  # valid JSON, no NaN nor Infinity
    assert [p.get("loss") for p in records.points("r0", json.loads(text))] == [0.5, "nan", "-inf"]


def test_an_odd_limit_keeps_the_newest_point():
    series = history.Series(limit=17)
    for step in range(1, 200):
        series.add(step, float(step), {})
        assert series.steps[-1] == step or step - series.steps[-1] < series.spacing


def test_a_series_too_large_for_a_message_is_thinned_to_fit():
    kept = history.History("j", ["r0"], limit=history.POINTS)
    for step in range(1, history.POINTS + 1):
        kept.add("r0", pb.Status(step=step, time=step, metrics={f"m{i}": 1.0 for i in range(30)}))
    whole = kept.wire("r0", 10**7)
    small = kept.wire("r0", len(whole) // 3)
    assert len(small) <= len(whole) // 3
    assert len(pb.MetricSeries.FromString(small).steps) >= history.POINTS // 4


def test_points_of_a_hand_edited_file_keep_only_what_fits():
    assert records.points("r0", {"step": "x"}) == []
    assert records.points("r0", {"step": [1, 2], "time": [1.0]}) == []
    columns = {"step": [1, None, True, 2], "time": [1.0, 2.0, 3.0, 1e400],
               "loss": ["x", 1, 1, 1], "acc": [True, 1, 1, 1], "lr": [0.1, 1, 1, 1]}  # fmt: skip
    assert records.points("r0", columns) == [{"replica": "r0", "step": 1, "time": 1.0, "lr": 0.1}]


def test_an_earlier_runs_files_are_set_aside(tmp_path):
    from loomrun.records import read_changes, set_aside_earlier

    for name in ("metrics.json", "metrics.node1.json"):
        (tmp_path / name).write_text('{"replicas": {"r1": {"step": [1], "time": [1.0]}}}')
    for name in ("changes.jsonl", "changes.node1.jsonl"):
        (tmp_path / name).write_text('{"replica": "r1", "time": 1.0}\n')
    set_aside_earlier(tmp_path, time.time() + 1)
    assert records.read_metrics(tmp_path) == {} and read_changes(tmp_path) is None
    assert len(list(tmp_path.glob("metrics*-*.json"))) == 2
    assert len(list(tmp_path.glob("changes*-*.jsonl"))) == 2
    kept = history.History("j", ["r0"])
    kept.add("r0", pb.Status(step=1, time=1.0, metrics={"loss": 2.0}))
    assert kept.write([tmp_path], "metrics.json") == []
    assert records.read_metrics(tmp_path)["r0"]["loss"] == [2.0]
    assert kept.write([tmp_path / "missing"], "metrics.json")[0].startswith("cannot write")


def test_reserved_names_are_not_metrics():
    status = pb.Status(step=3, steps_per_sec=2.0, metrics={"loss": 1.0, "step": 9.0})
    status.values["lr"].f = 0.5
    assert history.status_values(status) == {"loss": 1.0, "lr": 0.5, "steps_per_sec": 2.0}


def test_a_node_sets_aside_its_own_earlier_files_never_another_nodes(tmp_path):
    """Nodes sharing a folder start at their own times: node 1, starting late, must not move
    node 0's live ledger; node 0 moves its own, and those of ranks this run does not have."""
    from loomrun.records import set_aside_earlier

    for name in ("changes.jsonl", "changes.node1.jsonl", "changes.node2.jsonl", "metrics.json"):
        (tmp_path / name).write_text('{"replica": "r1", "time": 1.0}\n')
    later = time.time() + 1
    set_aside_earlier(tmp_path, later, node_rank=1, nnodes=2)
    left = sorted(p.name for p in tmp_path.glob("*.json*") if "-" not in p.name)
    assert left == ["changes.jsonl", "changes.node2.jsonl", "metrics.json"]
    set_aside_earlier(tmp_path, later, node_rank=0, nnodes=2)
    assert not [p for p in tmp_path.glob("*.json*") if "-" not in p.name]
