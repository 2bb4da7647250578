"""Snapshots, rollback and save as changes, in one process: a real relay, mailbox, worker
and pump (no broker), and a real torch module the worker is told to track. Each action is
done once and answered once; it leaves the desired state once answered, so a restarted
worker does not do it again; the memory budget and the periodic snapshots' rolling set."""

from __future__ import annotations

import pytest
import torch

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.control.outbox import Outbox
from loomrun.control.plane import ReplicaView, wire
from loomrun.desired import DesiredConfig, change
from loomrun.outcomes import outcome_sentence
from loomrun.params import from_pb
from loomrun.replay import schedules
from loomrun.runtime.worker import Worker

JOB = "snapshots"


class Rig:
    def __init__(self, mailbox, monkeypatch):
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        monkeypatch.delenv("LOOMRUN_SNAPSHOT_EVERY", raising=False)
        self.replica = ReplicaView("r0", 0, mailbox)
        self.outbox = Outbox(link=None)
        self.relay, self.pump = wire(JOB, {"r0": self.replica}, self.outbox)
        self.worker = Worker(mailbox)
        torch.manual_seed(0)
        self.model = torch.nn.Linear(64, 64)  # 16.6 KB of parameters
        self.worker.snapshots.finder.track(self.model)

    def act(self, name: str, value: dict) -> pb.DesiredParam:
        want = change(value)
        self.relay.take(S.desired_param(JOB, "r0", name), "PUT", want.SerializeToString())
        return want

    def step(self, times: int = 1) -> None:
        for _ in range(times):
            self.worker.boundary()
            with torch.no_grad():
                self.model.weight.add_(1.0)  # training moves it
        self.pump.read_back(self.replica, 0.0)

    def answers(self) -> list[pb.Outcome]:
        return [
            pb.Outcome.FromString(data)
            for subject, data in self.outbox._messages
            if subject.startswith(f"loomrun.{JOB}.outcomes.")
        ]

    def answer(self, want: pb.DesiredParam) -> pb.Outcome:
        found = [o for o in self.answers() if o.change_id == want.change_id]
        assert len(found) == 1, found
        return found[0]


@pytest.fixture
def rig(mailbox, monkeypatch):
    return Rig(mailbox, monkeypatch)


def test_an_action_is_done_once_answered_once_and_leaves_the_desired_state(rig):
    rig.step(3)
    at_snapshot = rig.model.weight.detach().clone()  # what step 4's boundary finds
    taken = rig.act("snapshot", {"name": "a"})
    assert rig.replica.changes.entry("snapshot").change_id == taken.change_id
    rig.step(2)
    said = rig.answer(taken)
    assert said.state == pb.APPLIED and said.step == 4
    done = from_pb(said.new)
    assert done["name"] == "a" and done["step"] == 4 and done["bytes"] == 64 * 65 * 4
    assert "snapshot a taken at step 4: 16.6 KB in" in outcome_sentence(said)
    assert rig.replica.changes.entry("snapshot") is None, "done: no longer desired"

    back = rig.act("rollback", {"name": "", "before": 0})
    assert rig.replica.changes.entry("rollback").change_id == back.change_id
    rig.step(1)
    said = rig.answer(back)
    assert said.state == pb.APPLIED and from_pb(said.old) == {"step": 6}
    assert torch.equal(rig.model.weight, at_snapshot + 1.0), "back at step 4, then one step"
    assert rig.replica.changes.entry("rollback") is None
    # The bucket keeps the key: delivered again (a reconnect), it is not done again.
    key = S.desired_param(JOB, "r0", "rollback")
    rig.relay.take(key, "PUT", back.SerializeToString())
    assert rig.replica.changes.entry("rollback") is None
    rig.step(2)
    assert len([o for o in rig.answers() if o.change_id == back.change_id]) == 1
    # A restart's baseline holds no action: a new worker does none again.
    rig.relay.rebase(rig.replica)
    assert not rig.replica.changes.desired.state.params


def test_a_refused_action_does_not_bring_back_the_one_before(rig):
    rig.step(2)
    first = rig.act("snapshot", {"name": "a"})
    rig.step(1)
    wrong = rig.act("snapshot", {"name": "not a name!"})
    rig.step(1)
    said = rig.answer(wrong)
    assert said.state == pb.REJECTED and "cannot name a snapshot" in said.reason
    assert rig.replica.changes.entry("snapshot") is None, "not the first one put back"
    rig.step(3)
    assert [o.change_id for o in rig.answers()] == [first.change_id, wrong.change_id]


def test_rollback_chooses_by_name_or_before_a_step_and_says_what_it_lacks(rig):
    rig.step(1)
    for name in ("s2", "s3", "s4"):
        rig.act("snapshot", {"name": name})
        rig.step(1)
    named = rig.act("rollback", {"name": "s3"})
    rig.step(1)
    assert from_pb(rig.answer(named).new)["name"] == "s3"
    before = rig.act("rollback", {"before": 4})
    rig.step(1)
    assert from_pb(rig.answer(before).new) | {"seconds": 0} == {
        "name": "s3",
        "step": 3,
        "seconds": 0,
    }
    cases = {
        "nope": ({"name": "nope"}, "no snapshot named 'nope' (it has: s2, s3, s4)"),
        "early": ({"before": 2}, "no snapshot taken before step 2 (the oldest is s2, at step 2)"),
        "later": ({"before": 99}, None),
        "bad": ({"before": "x"}, "before must be a step number, not 'x'"),
        "flat": (None, "rollback takes a structured value"),
    }
    for value, reason in cases.values():
        want = change(value if value is not None else "s2")
        rig.relay.take(S.desired_param(JOB, "r0", "rollback"), "PUT", want.SerializeToString())
        rig.step(1)
        said = rig.answer(want)
        if reason is None:  # past the present step: the newest, not one of this very step
            assert from_pb(said.new)["name"] == "s4", said
            continue
        assert said.state == pb.REJECTED and reason in said.reason, said.reason


def test_the_memory_budget_drops_the_oldest_and_says_so(rig, monkeypatch):
    monkeypatch.setenv("LOOMRUN_SNAPSHOT_MEMORY", str(2 * 64 * 65 * 4 + 100))  # two fit
    rig.step(1)
    for name in ("a", "b"):
        rig.act("snapshot", {"name": name})
        rig.step(1)
    third = rig.act("snapshot", {"name": "c"})
    rig.step(1)
    said = rig.answer(third)
    assert said.state == pb.APPLIED and said.reason == "dropped a to stay within the memory budget"
    assert [s.name for s in rig.worker.snapshots.kept] == ["b", "c"]
    monkeypatch.setenv("LOOMRUN_SNAPSHOT_MEMORY", "1K")
    big = rig.act("snapshot", {"name": "d"})
    rig.step(1)
    said = rig.answer(big)
    assert said.state == pb.REJECTED
    assert "takes 16.6 KB here, more than the budget of 1.0 KB" in said.reason
    assert [s.name for s in rig.worker.snapshots.kept] == ["b", "c"], "none dropped for it"


def test_periodic_snapshots_roll_and_named_ones_stay(rig):
    rig.step(1)
    rig.act("snapshot", {"name": "mine"})
    rig.step(1)
    every = rig.act("snapshot_every", {"every": 3, "keep": 2})
    rig.step(1)
    said = rig.answer(every)
    assert from_pb(said.new) == {"every": 3, "keep": 2}
    assert from_pb(said.old) == {"every": 0, "keep": 2}
    assert outcome_sentence(said) == "a snapshot every 3 steps from step 3, the last 2 kept"
    rig.step(10)  # steps 4..13: periodic ones at 6, 9, 12
    kept = [(s.name, s.step, s.periodic) for s in rig.worker.snapshots.kept]
    assert kept == [("mine", 2, False), ("step-9", 9, True), ("step-12", 12, True)]
    rig.worker.write_status(0.0)
    status = rig.replica.mailbox.status.read()[1]
    assert [s.name for s in status.snapshots] == ["mine", "step-9", "step-12"]
    assert (status.snapshot_every, status.snapshot_keep) == (3, 2)
    off = rig.act("snapshot_every", {"every": 0, "keep": 1})
    rig.step(5)
    assert outcome_sentence(rig.answer(off)).startswith("periodic snapshots off from step")
    assert [s.name for s in rig.worker.snapshots.kept] == ["mine", "step-12"]


def test_save_needs_an_absolute_folder_and_writes_one_file(rig, tmp_path):
    rig.step(1)
    relative = rig.act("save", {"dir": "ckpt"})
    rig.step(1)
    assert "save needs an absolute folder, not 'ckpt'" in rig.answer(relative).reason
    saved = rig.act("save", {"dir": str(tmp_path / "s-{step}")})
    rig.step(1)
    said = rig.answer(saved)
    assert said.state == pb.APPLIED, said.reason
    done = from_pb(said.new)
    assert done["file"] == str(tmp_path / "s-3" / "r0.pt")
    data = torch.load(done["file"], weights_only=True)
    assert data["step"] == 3 and data["format"] == "loomrun-checkpoint/1"
    assert torch.allclose(data["modules"][0]["state_dict"]["weight"], rig.model.weight - 1.0)


def test_a_restart_keeps_an_action_not_done_yet_waiting_with_no_base():
    desired = DesiredConfig()
    desired.take("lr", change(0.1))
    desired.take("rollback", change({"name": "a"}))
    earlier = change({"name": "b"})
    starts = desired.rebase(settled=None, in_effect={"rollback": earlier})  # all settled
    assert "rollback" not in starts and starts["lr"].at_once, "the lr, not the action"
    assert not desired.state.params["rollback"].at_once
    assert not desired.state.params["rollback"].HasField("base")


def test_a_replayed_rollback_takes_its_periodic_snapshot_first():
    records = [
        {"replica": "r0", "name": "rollback", "step": 80, "outcome": "applied",
         "new": {"name": "step-50", "step": 50, "seconds": 0.001}, "change_id": "x",
         "kind": "set", "ended": False, "parts": None},
        {"replica": "r0", "name": "save", "step": 90, "outcome": "applied",
         "new": {"dir": "/tmp/x"}, "change_id": "y", "kind": "set", "ended": False, "parts": None},
    ]  # fmt: skip
    plans, _ = schedules(records, ["r0"])
    assert [(c["name"], c["step"], c["value"]) for c in plans["r0"]] == [
        ("snapshot", 50, {"name": "step-50"}),
        ("rollback", 80, {"name": "step-50", "step": 50, "seconds": 0.001}),
    ], "and no save: a replay writes no checkpoint over the run's"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["snapshot", "bad name!"], "is not a snapshot name"),
        (["snapshot", "--keep", "3"], "--keep goes with --every N"),
        (["snapshot", "--list", "a"], "--list takes no NAME"),
        (["snapshot", "a", "--every", "5"], "--every takes no NAME"),
        (["snapshot", "--every", "-1"], "-1 is not in the range"),
        (["rollback", "a", "--before", "3"], "give a snapshot's NAME or --before STEP, not both"),
        (["rollback", "--before", "0"], "0 is not in the range"),
        (["save", " "], "the folder is empty"),
    ],
)
def test_usage_errors_say_what_is_wrong_before_anything_is_sent(args, said):
    from click.testing import CliRunner

    from loomrun.cli import main

    result = CliRunner().invoke(main, [*args, "--nats", "nats://127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert said in result.output and "Traceback" not in result.output


def test_a_rollback_never_goes_to_the_periodic_snapshot_of_its_own_step(rig):
    """At a multiple of --every the periodic snapshot is taken before that step's changes:
    it holds what a rollback there throws away."""
    every = rig.act("snapshot_every", {"every": 5})
    rig.step(4)  # steps 1..4; step-5 is due at the next boundary
    assert rig.answer(every).state == pb.APPLIED
    back = rig.act("rollback", {})
    rig.step(1)  # step 5: the periodic snapshot first, then the rollback
    said = rig.answer(back)
    assert said.state == pb.REJECTED
    assert "no snapshot taken before step 5 (the oldest is step-5, at step 5)" in said.reason
    assert from_pb(said.new) == {}
