"""What loomrun.hf.LoomCallback hands the Trainer's loggers for a change, and which of the
Trainer's logs become metrics."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from loomrun import hf  # noqa: E402


def test_numbers_strings_lists_and_fields_each_by_their_path():
    assert hf.logged("lr", 0.002) == {"loomrun/lr": 0.002}
    assert hf.logged("stop", True) == {"loomrun/stop": 1.0}
    assert hf.logged("optimizer", "adamw") == {"loomrun/optimizer": "adamw"}
    assert hf.logged("betas", [0.9, 0.95]) == {"loomrun/betas/0": 0.9, "loomrun/betas/1": 0.95}
    sched = {"warmup": 200, "peak": 0.003, "name": "cos", "mix": [1, 2], "a/b": 1}
    assert hf.logged("sched", sched) == {
        "loomrun/sched/warmup": 200.0,
        "loomrun/sched/peak": 0.003,
        "loomrun/sched/name": "cos",
        "loomrun/sched/mix/0": 1.0,
        "loomrun/sched/mix/1": 2.0,
        "loomrun/sched/a~1b": 1.0,
    }
    assert hf.logged("nothing", None) == {}


def test_only_the_trainers_numbers_become_metrics_not_the_changes_logged_back():
    logs = {"loss": 1.5, "epoch": 0.25, "grad_norm": 2, "flag": True, "name": "x"}
    logs["loomrun/lr"] = 0.1
    assert hf.as_metrics(logs) == {"loss": 1.5, "epoch": 0.25, "grad_norm": 2.0}
