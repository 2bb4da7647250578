"""The answer protocol in one process: a real relay, mailbox, worker and pump, no broker.

The relay takes entries as the bucket's watch delivers them; the worker steps; the pump
reads the acks and queues what it would publish. Every change written must get exactly
one answer, its own, whatever the order of writes and reads. (No supervisor process owns
this mailbox: the test is its one supervisor.)"""

from __future__ import annotations

import pytest

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.control.outbox import Outbox
from loomrun.control.plane import ReplicaView, wire
from loomrun.desired import change, copy
from loomrun.params import ParamSpec
from loomrun.runtime.target import Target
from loomrun.runtime.worker import Worker

JOB = "protocol"


class Rig:
    def __init__(self, mailbox, monkeypatch):
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        self.replica = ReplicaView("r0", 0, mailbox)
        self.outbox = Outbox(link=None)
        self.relay, self.pump = wire(JOB, {"r0": self.replica}, self.outbox)
        self.worker = Worker(mailbox)
        self.values = {"lr": 0.1}
        spec = ParamSpec("lr", "float", min=0.0)
        self.worker.add_target(
            Target(spec, lambda: self.values["lr"], lambda v: self.values.update(lr=v))
        )
        self.revision = 0

    def write(self, value, at_step=0, change_id="", name="lr") -> pb.DesiredParam:
        want = change(value, at_step=at_step, change_id=change_id)
        self.revision += 1
        self.relay.take(S.desired_param(JOB, "r0", name), "PUT", want.SerializeToString())
        return want

    def step(self, times: int = 1) -> None:
        for _ in range(times):
            self.worker.boundary()
        self.pump.read_back(self.replica, 0.0)

    def answers(self) -> list[tuple[str, str]]:
        """(change id, state) of every outcome published, in order."""
        found = []
        for subject, data in self.outbox._messages:
            if subject.startswith(f"loomrun.{JOB}.outcomes."):
                outcome = pb.Outcome.FromString(data)
                found.append((outcome.change_id, pb.OutcomeState.Name(outcome.state)))
        return found


@pytest.fixture
def rig(mailbox, monkeypatch):
    return Rig(mailbox, monkeypatch)


def test_the_same_key_twice_gets_two_answers_each_its_own(rig):
    x = rig.write(0.2)
    rig.step()
    y = rig.write(0.2)
    rig.step()
    assert rig.answers() == [(x.change_id, "APPLIED"), (y.change_id, "APPLIED")]
    assert rig.values["lr"] == 0.2


def test_a_change_replaced_before_the_worker_read_it_is_superseded_once(rig):
    x = rig.write(0.2)
    y = rig.write(0.3)
    rig.step()
    rig.step()
    assert sorted(rig.answers()) == sorted([(y.change_id, "APPLIED"), (x.change_id, "SUPERSEDED")])
    assert rig.values["lr"] == 0.3


def test_a_change_replaced_while_it_waited_for_its_step_is_superseded_by_the_worker(rig):
    rig.step(3)
    x = rig.write(0.2, at_step=50)
    rig.step()
    y = rig.write(0.3)
    rig.step(60)
    assert rig.answers() == [(x.change_id, "SUPERSEDED"), (y.change_id, "APPLIED")]
    assert rig.values["lr"] == 0.3


def test_a_missed_change_is_applied_nowhere_even_when_seen_again(rig):
    a = rig.write(0.2)
    rig.step(5)
    b = rig.write(0.9, at_step=2)
    rig.step()
    assert rig.answers()[-1] == (b.change_id, "MISSED")
    assert rig.values["lr"] == 0.2
    assert rig.replica.changes.entry("lr").change_id == a.change_id, "put back in the relay"
    rig.write(0.9, at_step=2, change_id=b.change_id)  # the bucket's value, after a reconnect
    rig.step()
    assert rig.replica.changes.entry("lr").change_id == a.change_id, "the missed one stays out"
    c = rig.write(0.4)
    rig.step(2)
    assert rig.answers() == [
        (a.change_id, "APPLIED"),
        (b.change_id, "MISSED"),
        (c.change_id, "APPLIED"),
    ], "no second answer for the change put back"
    rig.relay.rebase(rig.replica)
    assert rig.replica.changes.entry("lr").change_id == c.change_id


def test_a_huge_value_does_not_stop_the_answers(rig):
    big = rig.write("x" * 70_000, name="note")
    rig.step(2)
    x = rig.write(0.5)
    rig.step(2)
    assert [state for _, state in rig.answers()] == ["REJECTED", "APPLIED"]
    assert rig.answers()[0][0] == big.change_id and rig.answers()[1][0] == x.change_id


def test_many_answers_in_one_step_all_reach_the_pump(rig):
    for i in range(300):
        spec = ParamSpec(f"p{i}", "int")
        rig.worker.targets[spec.name] = Target(spec, lambda: 0, lambda v: None)
    wants = [rig.write(i, name=f"p{i}") for i in range(300)]
    rig.step()
    assert {cid for cid, _ in rig.answers()} == {w.change_id for w in wants}


def test_a_deleted_change_is_answered_superseded(rig):
    rig.step(3)
    x = rig.write(0.2, at_step=100)
    rig.step()
    rig.relay.take(S.desired_param(JOB, "r0", "lr"), "DEL", None)
    rig.step(2)
    assert rig.answers() == [(x.change_id, "SUPERSEDED")]


def test_a_rank_of_several_holds_a_change_until_it_knows_its_group(mailbox, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    worker = Worker(mailbox)
    values = {}
    worker.add_target(Target(ParamSpec("lr", "float"), lambda: 0.1, lambda v: values.update(lr=v)))
    relay, _ = wire(JOB, {"r0": ReplicaView("r0", 0, mailbox)}, Outbox(link=None))
    want = change(0.5)
    relay.take(S.desired_param(JOB, "r0", "lr"), "PUT", want.SerializeToString())
    worker.sync(at_boundary=False)
    assert values == {}, "not applied alone before the script set up its process group"
    worker.boundary()  # stepping with no process group: it trains alone after all
    assert values == {"lr": 0.5}


def test_a_change_never_applied_is_not_brought_back_by_a_missed_one(rig):
    rig.step(5)
    a = rig.write(0.2)
    b = rig.write(0.9, at_step=2)  # replaces a before the worker read it, then is missed
    rig.step(3)
    assert sorted(rig.answers()) == sorted([(a.change_id, "SUPERSEDED"), (b.change_id, "MISSED")])
    rig.step(5)
    assert rig.values["lr"] == 0.1, "neither applied: the value the worker had stays"
    assert len(rig.answers()) == 2, "no second answer for a"


def test_a_key_of_another_job_with_the_same_replica_name_is_left_out(rig):
    """Whatever a watch delivers, the relay takes its own job's keys only: `r0` of
    another job is not this `r0`."""
    rig.step(2)
    other = change(0.7)
    rig.relay.take(S.desired_param("otherjob", "r0", "lr"), "PUT", other.SerializeToString())
    rig.step(2)
    assert rig.values["lr"] == 0.1 and rig.answers() == []
    mine = rig.write(0.3)
    rig.step(2)
    assert rig.values["lr"] == 0.3 and rig.answers() == [(mine.change_id, "APPLIED")]


def test_a_rejected_change_is_not_what_a_restarted_worker_starts_from(rig):
    """The user was told `rejected`: neither a reconnect's replay of the bucket nor a
    restart brings it back (it stayed desired, and a restarted worker applied it)."""
    a = rig.write(0.2)
    rig.step(2)
    b = rig.write(-1.0)  # under the parameter's minimum: the worker refuses it
    rig.step(2)
    assert rig.answers() == [(a.change_id, "APPLIED"), (b.change_id, "REJECTED")]
    assert rig.replica.changes.entry("lr").change_id == a.change_id
    rig.write(-1.0, change_id=b.change_id)  # the bucket's value, after a reconnect
    rig.replica.mailbox.reset_worker_side()  # the worker restarts
    rig.relay.rebase(rig.replica)
    assert rig.replica.changes.entry("lr").change_id == a.change_id
    restarted = Worker(rig.replica.mailbox)
    restarted.sync(at_boundary=False)
    values = {"lr": 0.1}
    spec = ParamSpec("lr", "float", min=0.0)
    restarted.add_target(Target(spec, lambda: values["lr"], lambda v: values.update(lr=v)))
    restarted.boundary()
    assert values["lr"] == 0.2, "the change in effect, not the script's own value"


def test_the_change_in_effect_outlives_many_later_changes(rig):
    """The relay keeps the latest TAKEN_KEPT changes, and the ones in effect whatever
    their age: a missed change goes back to it after any number of others."""
    from loomrun.control.changes import TAKEN_KEPT

    spec = ParamSpec("momentum", "float")
    rig.worker.targets["momentum"] = Target(spec, lambda: 0.9, lambda v: None)
    a = rig.write(0.2)
    rig.step()
    for i in range(TAKEN_KEPT + 10):
        rig.write(0.5 + i / 10_000, name="momentum")
    rig.step(3)
    assert rig.replica.changes.taken_count() <= TAKEN_KEPT + 1
    b = rig.write(0.9, at_step=1)
    rig.step()
    assert rig.answers()[-1] == (b.change_id, "MISSED")
    assert rig.replica.changes.entry("lr").change_id == a.change_id, "not dropped"


def test_a_replayed_change_does_not_bring_back_an_answered_live_one(rig):
    """`--replay` with live control: the record's change applies at its step, and the live
    change answered before it is not applied (nor answered) a second time."""
    rig.worker.replay([{"step": 20, "name": "lr", "value": 0.7, "change_id": "recorded"}])
    a = rig.write(0.01)
    rig.step(6)
    rig.step(20)
    assert rig.answers() == [(a.change_id, "APPLIED"), ("recorded", "APPLIED")]
    assert rig.values["lr"] == 0.7
    assert rig.replica.changes.in_effect("lr") == a.change_id, "the desired state's own"


def test_a_malformed_answer_in_the_mailbox_is_left_out_and_the_next_ones_are_read(rig):
    """What no loomrun worker writes: a name no key takes, a count far past the last one
    (which made the pump ignore every later answer of the replica)."""
    junk = pb.Acks(recent=[
        pb.Outcome(name="bad name", change_id="x", seq=1, state=pb.APPLIED),
        pb.Outcome(name="lr", change_id="y", seq=1 << 40, state=pb.APPLIED),
    ])  # fmt: skip
    rig.replica.mailbox.acks.write(junk)
    rig.pump.read_back(rig.replica, 0.0)
    assert rig.answers() == [] and rig.replica.outcome_seq == 0
    a = rig.write(0.2)
    rig.step()
    assert rig.answers() == [(a.change_id, "APPLIED")]


def test_a_restart_applies_what_was_in_effect_at_once_and_a_waiting_change_waits():
    from loomrun.desired import DesiredConfig

    desired = DesiredConfig()
    applied = desired.set("lr", 0.2)
    in_effect = {"lr": copy(desired.entry("lr"))}
    waiting = desired.set("lr", 0.07, at_step=500)  # the ranks had not agreed on it yet
    agreed = desired.set("momentum", 0.8, at_step=600)  # agreed on, waiting for its step
    forced = desired.set("wd", 0.1, at_once=True)  # --force: some ranks only, no agreement
    desired.rebase({applied, agreed}, in_effect)
    lr, momentum, wd = (desired.entry(n) for n in ("lr", "momentum", "wd"))
    assert (lr.change_id, lr.at_once, lr.at_step) == (waiting, False, 0)
    assert (lr.base.change_id, lr.base.at_once, lr.base.value.f) == (applied, True, 0.2)
    assert (momentum.change_id, momentum.at_once, momentum.at_step) == (agreed, True, 0)
    assert (wd.change_id, wd.at_once) == (forced, True)


def test_a_restarted_worker_trains_with_the_change_in_effect_while_a_newer_one_waits(
    mailbox, monkeypatch
):
    """A rank of a group restarts with a change still waiting for the ranks' agreement:
    the value in effect before it applies at once meanwhile, not the script's own."""
    rig = Rig(mailbox, monkeypatch)
    a = rig.write(0.2)
    rig.step(2)
    rig.replica.changes.acks_read(set(), read_version=0)  # no change waits for its step
    rig.write(0.07)  # replaced before the worker read it: it waits, as at a cut-off node
    rig.relay.rebase(rig.replica)
    assert rig.replica.changes.entry("lr").base.change_id == a.change_id
    monkeypatch.setenv("WORLD_SIZE", "2")  # the restarted rank waits for its group
    mailbox.reset_worker_side()
    restarted = Worker(mailbox)
    restarted.sync(at_boundary=False)  # as it attaches, before the script runs
    values = {"lr": 0.1}
    restarted.add_target(Target(ParamSpec("lr", "float"), lambda: values["lr"],
                                lambda v: values.update(lr=v)))  # fmt: skip
    assert values["lr"] == 0.2, "before its first step: the change in effect, at once"
    restarted.boundary()  # no process group after all: it trains alone, and takes it
    assert values["lr"] == 0.07


def test_a_handler_function_is_called_and_a_methods_value_reaches_later_instances(
    mailbox, monkeypatch
):
    """A function defined in a function is called with the value; a method (here of a class
    made in a function) gets a value changed before its instance was made (a restarted
    worker's) when the instance is made."""
    import loomrun
    from loomrun.runtime import worker as runtime

    rig = Rig(mailbox, monkeypatch)
    monkeypatch.setattr(runtime, "current", rig.worker)
    seen: list[float] = []

    @loomrun.handler("temperature")
    def on_temperature(value: float = 1.0):
        seen.append(value)

    class Model:
        @loomrun.handler("dropout")
        def set_dropout(self, p: float = 0.1):
            self.p = p

        @staticmethod
        @loomrun.handler("beta")
        def set_beta(value: float = 0.5):  # in a class, and called as a function
            seen.append(value)

    rig.write(0.7, name="temperature")
    rig.write(0.3, name="dropout")
    rig.write(0.9, name="beta")
    rig.step()
    assert sorted(seen) == [0.7, 0.9]
    assert [state for _, state in rig.answers()] == ["APPLIED"] * 3
    assert Model().p == 0.3, "made after the change: given it"


def test_a_change_before_the_restarted_worker_answers_keeps_its_start_as_base(mailbox, monkeypatch):
    """What a restarted worker starts from (here a change the ranks agreed on, waiting for
    its step) is the base of a change that comes before the worker answered for that name;
    a base never applies once the worker answered for the name, and once the supervisor
    read that answer, later changes have none."""
    rig = Rig(mailbox, monkeypatch)
    rig.write(0.2)
    rig.step(2)
    agreed = rig.write(0.3, at_step=10_000)
    rig.step()
    rig.replica.changes.acks_read({agreed.change_id}, read_version=0)  # as agreed ranks' acks say
    rig.replica.mailbox.reset_worker_side()  # the restart, as the plane makes it
    rig.relay.rebase(rig.replica)
    rig.replica.outcome_seq = 0
    c = rig.write(0.5)  # before the restarted worker read anything
    entry = rig.replica.changes.entry("lr")
    assert (entry.change_id, entry.base.change_id) == (c.change_id, agreed.change_id)
    restarted = Worker(rig.replica.mailbox)
    restarted.sync(at_boundary=False)
    values = {"lr": 0.1}
    restarted.add_target(Target(ParamSpec("lr", "float"), lambda: values["lr"],
                                lambda v: values.update(lr=v)))  # fmt: skip
    restarted.boundary()
    d = rig.write(0.6)  # the supervisor has not read the new worker's answers: a stale base
    assert rig.replica.changes.entry("lr").base.change_id == agreed.change_id
    restarted.boundary()
    rig.pump.read_back(rig.replica, 0.0)
    after = rig.answers()[-3:]
    assert after == [(agreed.change_id, "APPLIED"), (c.change_id, "APPLIED"),
                     (d.change_id, "APPLIED")], after  # fmt: skip
    assert values["lr"] == 0.6, "the stale base was not applied after the worker's answers"
    assert rig.replica.changes.starts_from("lr") is None
    rig.write(0.7)
    assert not rig.replica.changes.entry("lr").HasField("base")
