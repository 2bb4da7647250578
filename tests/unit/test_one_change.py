"""One `set` of several keys is one change, in one process: a real relay, mailbox, worker
and pump, no broker (the rig of test_protocol). Its keys come off the broker one by one;
the worker sees the change whole or not at all, applies all of it at one step or none of
it, and it gets one answer with every part."""

from __future__ import annotations

import pytest
from test_protocol import JOB, Rig

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.desired import change, new_change_id
from loomrun.params import ParamSpec
from loomrun.runtime.target import Target
from loomrun.runtime.worker import Worker


class Several(Rig):
    """The rig with three declared parameters, each with a record of its calls."""

    def __init__(self, mailbox, monkeypatch):
        super().__init__(mailbox, monkeypatch)
        self.values.update(batch=32, mode="a")
        self.calls: list[tuple[str, object]] = []

        def put(name):
            def handler(value):
                if value == "boom":
                    raise RuntimeError("no such mode")
                self.calls.append((name, value))
                self.values[name] = value

            return handler

        for spec in (ParamSpec("batch", "int", min=1), ParamSpec("mode", "str")):
            name = spec.name
            self.worker.add_target(Target(spec, lambda n=name: self.values[n], put(name)))

    def write_keys(self, values: dict, change_id: str = "", order=None, at_step=0):
        """One change of several keys, each key written as the client writes it; `order`:
        the names in the order the bucket delivers them."""
        change_id = change_id or new_change_id()
        for name in order or sorted(values):
            want = change(values[name], at_step, False, "me", change_id, pb.SET, list(values))
            self.relay.take(S.desired_param(JOB, "r0", name), "PUT", want.SerializeToString())
        return change_id

    def outcomes(self) -> list[pb.Outcome]:
        return [
            pb.Outcome.FromString(data)
            for subject, data in self.outbox._messages
            if subject.startswith(f"loomrun.{JOB}.outcomes.")
        ]


@pytest.fixture
def rig(mailbox, monkeypatch):
    return Several(mailbox, monkeypatch)


def restart(mailbox) -> tuple[Worker, dict]:
    """A restarted worker on the mailbox, as it attaches, then declaring lr and batch."""
    restarted = Worker(mailbox)
    restarted.sync(at_boundary=False)
    values = {"lr": 0.1, "batch": 32}
    for spec in (ParamSpec("lr", "float"), ParamSpec("batch", "int")):
        name = spec.name
        restarted.add_target(
            Target(spec, lambda n=name: values[n], lambda v, n=name: values.update({n: v}))
        )
    return restarted, values


def test_two_keys_are_one_change_one_answer_at_one_step(rig):
    rig.step(3)
    cid = rig.write_keys({"lr": 0.2, "batch": 64})
    rig.step()
    [outcome] = rig.outcomes()
    assert (outcome.change_id, outcome.state, outcome.step) == (cid, pb.APPLIED, 4)
    assert [(p.name, p.old.i or p.old.f, p.new.i or p.new.f) for p in outcome.parts] == [
        ("batch", 32, 64),
        ("lr", 0.1, 0.2),
    ]
    assert (outcome.name, outcome.old.i, outcome.new.i) == ("batch", 32, 64), "the first part"
    assert rig.values["lr"] == 0.2 and rig.values["batch"] == 64


def test_the_worker_never_sees_part_of_a_change(rig):
    """The relay holds the first key until the rest of the change came."""
    rig.step(2)
    want = change(64, 0, False, "me", "c1", pb.SET, ["batch", "lr"])
    rig.relay.take(S.desired_param(JOB, "r0", "batch"), "PUT", want.SerializeToString())
    rig.step(3)
    assert rig.values["batch"] == 32 and rig.outcomes() == []
    assert rig.replica.changes.entry("batch") is None, "not in the mailbox's desired state"
    second = change(0.3, 0, False, "me", "c1", pb.SET, ["batch", "lr"])
    rig.relay.take(S.desired_param(JOB, "r0", "lr"), "PUT", second.SerializeToString())
    rig.step()
    assert [o.change_id for o in rig.outcomes()] == ["c1"]
    assert (rig.values["batch"], rig.values["lr"]) == (64, 0.3)


def test_one_bad_value_rejects_the_whole_change_and_nothing_is_applied(rig):
    cid = rig.write_keys({"lr": 0.2, "batch": -5})  # batch's minimum is 1
    rig.step(2)
    [outcome] = rig.outcomes()
    assert (outcome.change_id, outcome.state) == (cid, pb.REJECTED)
    assert outcome.reason == "invalid value for batch: -5 is below the minimum 1"
    assert (rig.values["lr"], rig.values["batch"]) == (0.1, 32) and rig.calls == []
    assert rig.replica.changes.entry("lr") is None, "applied nowhere: not desired any more"
    assert rig.replica.changes.entry("batch") is None


def test_a_handler_that_raises_puts_back_the_ones_run_before_it(rig):
    cid = rig.write_keys({"batch": 64, "mode": "boom"})
    rig.step(2)
    [outcome] = rig.outcomes()
    assert (outcome.change_id, outcome.state) == (cid, pb.REJECTED)
    assert outcome.reason == "mode handler raised RuntimeError: no such mode"
    assert rig.calls == [("batch", 64), ("batch", 32)], "run, then put back"
    assert rig.values["batch"] == 32


def test_a_key_that_moves_on_before_the_rest_came_supersedes_the_change(rig):
    """Delivered in the stream's order: batch of change 1, batch of change 2 (a later
    `set batch=`), then lr of change 1. Change 1 can never be whole: superseded, once."""
    rig.step(2)
    first = change(64, 0, False, "me", "c1", pb.SET, ["batch", "lr"])
    rig.relay.take(S.desired_param(JOB, "r0", "batch"), "PUT", first.SerializeToString())
    later = rig.write(16, name="batch")
    rest = change(0.3, 0, False, "me", "c1", pb.SET, ["batch", "lr"])
    rig.relay.take(S.desired_param(JOB, "r0", "lr"), "PUT", rest.SerializeToString())
    rig.step(2)
    states = [(o.change_id, pb.OutcomeState.Name(o.state)) for o in rig.outcomes()]
    assert states == [("c1", "SUPERSEDED"), (later.change_id, "APPLIED")]
    assert (rig.values["batch"], rig.values["lr"]) == (16, 0.1), "none of change 1"
    assert rig.replica.changes.entry("lr") is None


def test_a_change_replaced_in_part_before_the_worker_read_it_is_superseded_whole(rig):
    """Written whole, then a later change to one of its keys, before any step: the worker
    never applies any of it, and the other key goes back to what is in effect."""
    rig.step(2)
    before = rig.write(0.15)
    rig.step()
    cid = rig.write_keys({"lr": 0.2, "batch": 64})
    later = rig.write(0.5)
    rig.step(2)
    states = [(o.change_id, pb.OutcomeState.Name(o.state)) for o in rig.outcomes()]
    assert sorted(states) == sorted(
        [(before.change_id, "APPLIED"), (cid, "SUPERSEDED"), (later.change_id, "APPLIED")]
    ), "the worker never read it whole: the supervisor answers it"
    assert (rig.values["lr"], rig.values["batch"]) == (0.5, 32)
    assert rig.replica.changes.entry("batch") is None, "not desired: it was never applied"
    rig.step(3)
    assert len(rig.outcomes()) == 3, "answered once: not again as the worker reads batch gone"


def test_a_change_seen_again_after_a_reconnect_is_not_answered_again(rig):
    cid = rig.write_keys({"lr": 0.2, "batch": 64})
    rig.step(2)
    version = rig.replica.changes.desired.state.version
    rig.write_keys({"lr": 0.2, "batch": 64}, change_id=cid, order=["lr", "batch"])
    assert rig.replica.changes.desired.state.version == version, "taken again: not written"
    rig.step(2)
    assert [o.change_id for o in rig.outcomes()] == [cid]


def test_the_rest_of_a_change_superseded_by_the_relay_stays_out_after_a_reconnect(rig):
    rig.step(2)
    first = change(64, 0, False, "me", "c1", pb.SET, ["batch", "lr"])
    rig.relay.take(S.desired_param(JOB, "r0", "batch"), "PUT", first.SerializeToString())
    rig.write(16, name="batch")
    rest = change(0.3, 0, False, "me", "c1", pb.SET, ["batch", "lr"])
    for _ in range(2):  # as it comes, then the watch's latest value of lr after a reconnect
        rig.relay.take(S.desired_param(JOB, "r0", "lr"), "PUT", rest.SerializeToString())
        rig.step(2)
    assert [o.change_id for o in rig.outcomes()][0] == "c1" and len(rig.outcomes()) == 2
    assert rig.replica.changes.entry("lr") is None and rig.values["lr"] == 0.1


def test_a_change_left_half_way_is_answered_when_too_many_wait(rig):
    from loomrun.control.changes import PENDING_KEPT

    for i in range(PENDING_KEPT + 1):  # each waits for its lr, on a key of its own
        half = change(i + 1, 0, False, "me", f"half{i}", pb.SET, ["lr", f"p{i}"])
        rig.relay.take(S.desired_param(JOB, "r0", f"p{i}"), "PUT", half.SerializeToString())
    states = [(o.change_id, pb.OutcomeState.Name(o.state)) for o in rig.outcomes()]
    assert states == [("half0", "SUPERSEDED")], "the oldest, answered; the others wait"


def test_a_restart_after_part_of_a_change_was_replaced_starts_from_the_rest_of_it(rig):
    rig.write_keys({"lr": 0.2, "batch": 64})
    rig.step(2)
    rig.write(0.5)
    rig.step(2)
    rig.replica.mailbox.reset_worker_side()
    rig.relay.rebase(rig.replica)
    restarted, values = restart(rig.replica.mailbox)
    restarted.boundary()
    assert values == {"lr": 0.5, "batch": 64}, "batch from the change in effect, lr after it"


def test_a_change_waiting_for_its_step_applies_whole_there(rig):
    rig.step(2)
    cid = rig.write_keys({"lr": 0.2, "batch": 64}, at_step=10)
    rig.step(5)
    assert rig.outcomes() == [] and rig.values["batch"] == 32
    rig.step(5)
    [outcome] = rig.outcomes()
    assert (outcome.change_id, outcome.step, outcome.state) == (cid, 10, pb.APPLIED)
    assert (rig.values["lr"], rig.values["batch"]) == (0.2, 64)


def test_a_restarted_worker_starts_from_every_key_of_the_change_in_effect(rig):
    rig.write_keys({"lr": 0.2, "batch": 64})
    rig.step(2)
    rig.replica.mailbox.reset_worker_side()
    rig.relay.rebase(rig.replica)
    restarted, values = restart(rig.replica.mailbox)
    restarted.boundary()
    assert values == {"lr": 0.2, "batch": 64}


def test_a_restart_answers_the_change_it_starts_from_once_though_a_key_of_it_waits(
    mailbox, monkeypatch
):
    """lr of an applied change {batch, lr} is replaced by one still waiting for the ranks:
    the restarted worker starts from the applied change, batch and lr, answered once."""
    rig = Several(mailbox, monkeypatch)
    cid = rig.write_keys({"lr": 0.2, "batch": 64})
    rig.step(2)
    rig.replica.changes.acks_read(set(), read_version=0)
    rig.write(0.07)  # replaced before the worker read it: it waits, as at a cut-off node
    rig.relay.rebase(rig.replica)
    monkeypatch.setenv("WORLD_SIZE", "2")  # the restarted rank waits for its group
    mailbox.reset_worker_side()
    _, values = restart(mailbox)
    assert values == {"lr": 0.2, "batch": 64}
    _, acks = mailbox.acks.read()
    again = [o for o in acks.recent if o.change_id == cid]
    assert len(again) == 1 and [p.name for p in again[0].parts] == ["batch", "lr"]


def test_a_malformed_list_of_keys_is_left_out(rig, capsys):
    for together in (["lr"], ["batch", "lr", "lr"], ["lr", "batch"], ["lr", "pause"]):
        want = change(0.2, change_id="x")
        want.together[:] = together
        rig.relay.take(S.desired_param(JOB, "r0", "lr"), "PUT", want.SerializeToString())
    rig.step(2)
    assert rig.outcomes() == [] and rig.values["lr"] == 0.1
    assert capsys.readouterr().err.count("malformed list of its change's keys") == 4


def test_get_shows_the_parts_an_optimizer_step_did_not_write_over_as_applied():
    from loomrun.outcomes import outcome_sentence, part_of

    outcome = pb.Outcome(name="lr", state=pb.OVERRIDDEN, step=5, reason="it wrote lr=0.1")
    outcome.parts.add(name="lr", overridden=True).new.f = 0.2
    outcome.parts.add(name="momentum").new.f = 0.5
    assert part_of(outcome, "momentum").state == pb.APPLIED
    assert part_of(outcome, "lr").state == pb.OVERRIDDEN
    assert outcome_sentence(outcome).startswith("lr overridden at step 5")


def test_a_change_of_several_keys_is_agreed_on_in_one_bucket():
    """Ranks agree per bucket of names: every key of a change is in its first key's
    bucket, so the ranks take it whole or not at all."""
    from loomrun.runtime.group import bucket, digests

    names = [f"p{i}" for i in range(40)]
    apart = next((a, b) for a in names for b in names if a < b and bucket(a) != bucket(b))
    together = change(1, change_id="c", together=list(apart))
    found = digests({name: together for name in apart})
    assert sum(1 for d in found if d) == 1 and found[bucket(apart[0])]
