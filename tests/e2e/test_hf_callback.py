"""`loomrun.hf.LoomCallback()` in a real Hugging Face Trainer run (a tiny GPT-2 from a
config, nothing downloaded): the Trainer's logs are the replica's metrics; each applied
change is in the Trainer's TensorBoard event file at the step it took effect at; pause and
resume hold the Trainer's loop; the optimizer switch and the built-ins work under it."""

from __future__ import annotations

import json
import re

import pytest
from conftest import SCRIPTS, run_loomrun, wait_for
from jobs import job_id, start, steps_seen, wait_ready


def set_json(*args) -> tuple[int, dict]:
    result = run_loomrun(*args, "--json")
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout) if result.stdout else {}


def _metrics(job: str) -> dict:
    snapshot = json.loads(run_loomrun("watch", "--once", "--json", "--job", job).stdout)
    replicas = [r for j in snapshot.get("jobs", []) for r in j["replicas"]]
    return replicas[0]["metrics"] if replicas else {}


def _events(folder) -> tuple[dict[str, dict[int, float]], dict[str, list[tuple[int, str]]]]:
    """The scalars and the texts of every TensorBoard event file in the folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    texts: dict[str, list[tuple[int, str]]] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
        for tag in events.Tags()["tensors"]:
            for e in events.Tensors(tag):
                texts.setdefault(tag, []).append((e.step, e.tensor_proto.string_val[0].decode()))
    return scalars, texts


@pytest.mark.slow
def test_the_trainer_in_one_line_metrics_changes_in_tensorboard_pause_and_switch(procs, tmp_path):
    job = job_id("hfcallback")
    sup = start(
        procs, SCRIPTS / "hf_trainer.py", "--max-steps", "100000", "--loom-callback", job=job,
        env={"TENSORBOARD_LOGGING_DIR": str(tmp_path / "tb")},
    )  # fmt: skip
    wait_ready(job, name="optimizer", timeout=120)
    wait_for(
        lambda: {"loss", "grad_norm", "learning_rate"} <= set(_metrics(job)), 60,
        what="the Trainer's logs as the replica's metrics",
    )  # fmt: skip

    code, lr = set_json("set", "lr=0.002", "--job", job)
    assert code == 0, lr
    lr_step = lr["changes"][0]["step"]

    code, paused = set_json("pause", "--job", job)
    assert code == 0 and paused["changes"][0]["state"] == "applied", paused
    held = paused["changes"][0]["step"]
    code, again = set_json("set", "weight_decay=0.05", "--job", job)  # applied while paused
    assert code == 0 and again["changes"][0]["step"] == held, "the Trainer's loop stood still"
    wait_for(lambda: steps_seen(job) == held, 30, what="the status at the paused step")
    code, resumed = set_json("resume", "--job", job)
    assert code == 0, resumed
    wait_for(lambda: steps_seen(job) > held + 5, 60, what="the Trainer stepping again")

    code, switch = set_json("set", "optimizer=sgd", "lr=0.01", "momentum=0.9", "--job", job)
    assert code == 0, switch
    switch_step = switch["changes"][0]["step"]
    wait_for(lambda: steps_seen(job) > switch_step + 5, 60, what="steps on SGD")
    code, stop = set_json("set", "stop=true", "--job", job)
    assert code == 0, stop
    out, err = sup.communicate(timeout=300)
    assert sup.returncode == 0, err
    assert "optimizer SGD" in out

    scalars, texts = _events(tmp_path / "tb")
    assert "train/loss" in scalars, sorted(scalars)  # the Trainer's own logging, untouched
    assert scalars["train/loomrun/lr"][lr_step] == pytest.approx(0.002)
    assert scalars["train/loomrun/weight_decay"] == {held: pytest.approx(0.05)}
    assert scalars["train/loomrun/lr"][switch_step] == pytest.approx(0.01)
    assert scalars["train/loomrun/momentum"][switch_step] == pytest.approx(0.9)
    assert (switch_step, "sgd") in texts["train/loomrun/optimizer/text_summary"], texts
    assert scalars["train/loomrun/stop"] and min(scalars["train/loomrun/stop"]) > switch_step
    used = [int(m[1]) for m in re.finditer(r"stepped (\d+) ", out)]
    assert used == list(range(1, len(used) + 1)), "every step once, on the one optimizer"
