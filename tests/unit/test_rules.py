"""Rules: the language (parsed, never evaluated: every error names its character), the
functions over status points, each metric's window between two statuses read, the
arithmetic a worker works out on the value in effect, and a rule firing in one process
on a real relay, mailbox, worker and pump (no broker): a spike between two statuses
fires it, once, and its change lands as lr*0.5 does, on the value then in effect."""

from __future__ import annotations

import math
import time

import pytest

from loomrun import params as P
from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.control.outbox import Outbox
from loomrun.control.plane import ReplicaView, wire
from loomrun.control.rules import Rules
from loomrun.desired import change
from loomrun.records import record
from loomrun.rulebook import read_rule, read_rules_file
from loomrun.rulelang import Metric, RuleError, Watcher, parse_actions, parse_condition
from loomrun.runtime.change import worked_out
from loomrun.runtime.metrics import FOLD_AT, Metrics
from loomrun.runtime.target import Target
from loomrun.runtime.worker import Worker

JOB = "rules"


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        ("loss >", 7, "found the end"),
        ("loss > * 3", 8, "found '*'"),
        ("loss.median > 1", 6, "not 'median'"),
        ("ema(loss) > 1", 9, "expected ','"),
        ("loss > 1 and 3", 14, "expected a comparison after 'and'"),
        ("loss", 5, "expected a comparison"),
        ("loss > 1 2", 10, "found '2'"),
        ("foo(loss, 2) > 1", 1, "unknown function 'foo'"),
        ("loss > 1 $", 10, "unexpected '$'"),
        ("ema(loss, 0) > 1", 11, "whole number of points"),
        ("ema(ema(loss, 2), 3) > 1", 5, "takes a metric, not a function"),
        ("loss > 1 > 2", 10, "'and' between two comparisons"),
        ("(loss > 1) + 2 > 0", 12, "needs numbers"),
        ("__import__('os') > 1", 12, "unexpected"),
    ],
)
def test_a_condition_that_does_not_parse_names_its_character(text, where, words):
    with pytest.raises(RuleError) as caught:
        parse_condition(text)
    said = str(caught.value)
    assert said.startswith(f"--when {text!r}: ") and said.endswith(f"at character {where}")
    assert words in said and "\n" not in said


def test_a_condition_too_long_or_too_deep_is_refused_in_one_line():
    for text in ["(" * 90 + "loss > 1" + ")" * 90, "loss" + " + loss" * 150 + " > 1",
                 "loss > " + "-" * 199 + "1", "x" * 1001]:  # fmt: skip
        with pytest.raises(RuleError) as caught:
            parse_condition(text)
        assert "\n" not in str(caught.value)
    with pytest.raises(RuleError, match="loomrun's own"):
        parse_actions("set pause=true")
    with pytest.raises(RuleError, match="parameter's name"):
        parse_actions("unset lr.")


def test_a_condition_reads_metrics_and_functions():
    condition = parse_condition("loss.max > 3 * ema(loss, 20) and not (acc >= 0.9 or -lr < -1)")
    assert [str(m) for m in condition.metrics] == ["loss.max", "loss", "acc", "lr"]
    assert [str(f) for f in condition.functions] == ["ema(loss, 20)"]


def test_functions_count_the_points_before_this_one():
    watcher = Watcher(parse_condition("loss > 2 * mean(loss, 3) and loss.max >= max(loss.max, 3)"))
    loss, peak = Metric("loss"), Metric("loss", "max")
    seen = [watcher.see({loss: v, peak: v}) for v in (1.0, 1.0, 1.0)]
    assert [s[0] for s in seen] == [False] * 3  # not met before 3 points: nothing to compare
    assert "mean(loss, 3)" not in seen[-1][1]
    met, values = watcher.see({loss: 2.5, peak: 2.5})
    assert met and values["mean(loss, 3)"] == 1.0 and values["max(loss.max, 3)"] == 1.0
    assert watcher.see({peak: 9.0}) is None  # `loss` not reported since: not a point
    met, values = watcher.see({loss: 2.5, peak: 2.5})
    assert not met and values["mean(loss, 3)"] == pytest.approx(1.5)


def test_ema_starts_at_the_first_point():
    watcher = Watcher(parse_condition("loss > ema(loss, 3)"))
    for v in (4.0, 2.0, 2.0):
        watcher.see({Metric("loss"): v})
    _, values = watcher.see({Metric("loss"): 0.0})
    assert values["ema(loss, 3)"] == pytest.approx(2.5)  # 4, then halfway to 2 twice


def test_actions():
    actions = parse_actions("rollback; set lr=lr*0.5 wd=1e-3 b=b/4 m=m-0.1; unset x y; save /c")
    assert [a.word for a in actions] == ["rollback", "set", "unset", "save"]
    assigns = actions[1].assigns
    assert [(a.key, a.op, a.number, a.text) for a in assigns] == [
        ("lr", "*", 0.5, ""), ("wd", "", 0.0, "1e-3"), ("b", "/", 4.0, ""), ("m", "-", 0.1, ""),
    ]  # fmt: skip
    assert str(actions[1]) == "set lr=lr*0.5 wd=1e-3 b=b/4 m=m-0.1"
    assert actions[3].arg == "/c"


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        ("rollback;", 10, "expected an action"),
        ("set lr=wd*2", 8, "not 'wd'"),
        ("jump", 1, "unknown action 'jump'"),
        ("set lr", 7, "expected KEY=VALUE"),
        ("save", 5, "one folder"),
        ("set lr=lr/0", 11, "not zero"),
        ("pause now", 7, "takes nothing"),
        ("set lr=1 lr=2", 5, "set twice"),
        ("save ckpt", 6, "an absolute folder"),
    ],
)
def test_actions_that_do_not_parse_name_their_character(text, where, words):
    with pytest.raises(RuleError) as caught:
        parse_actions(text)
    assert str(caught.value).endswith(f"at character {where}") and words in str(caught.value)


def test_a_rule_and_a_rules_file(tmp_path):
    with pytest.raises(RuleError, match="rule name"):
        read_rule(pb.Rule(name="no good", when="loss > 1", then="pause"))
    with pytest.raises(RuleError, match="across is one of"):
        read_rule(pb.Rule(name="a", when="loss > 1", then="pause", across="median"))
    path = tmp_path / "rules.toml"
    path.write_text('[spike]\nwhen = "loss > 3 * ema(loss, 20)"\nthen = "rollback"\n'
                    'cooldown = 300\nreplicas = ["r1"]\n')  # fmt: skip
    (rule,) = read_rules_file(path)
    assert (rule.name, rule.cooldown, list(rule.replicas)) == ("spike", 300, ["r1"])
    for text, words in [
        ('[a]\nwhen = "loss >"\nthen = "pause"\n', "rule a: --when 'loss >'"),
        ('[a]\nwhen = "loss > 1"\n', "needs both when and then"),
        ('[a]\nwhen = "loss > 1"\nthen = "pause"\ncooldown = "x"\n', "cooldown = 'x'"),
        ('[a]\nwhen = "loss > 1"\nthen = "pause"\ncooldown = -1\n', "0 or more"),
        ("a = 1\n", "not a table"),
        ("[a\n", "is not TOML"),
    ]:
        path.write_text(text)
        with pytest.raises(RuleError, match="rules.toml") as caught:
            read_rules_file(path)
        assert words in str(caught.value)


# -- each metric's window between two statuses read -----------------------------------


def test_the_window_holds_every_value_since_the_status_read_last():
    import torch

    metrics = Metrics(print)
    for value in (1.0, 9.0, 2.0):
        metrics.report({"loss": value})
    numbers, windows = metrics.numbers(0.0)
    metrics.written(2, 10)
    assert numbers == {"loss": 2.0}
    w = windows["loss"]
    assert (w.count, w.total, w.low, w.high) == (3, 12.0, 1.0, 9.0)
    metrics.put("loss", torch.tensor(5.0))  # the tensor a backward saw, read at the status
    _, windows = metrics.numbers(0.0, read=0)  # the status before was not read: both
    metrics.written(4, 20)
    assert metrics.window_step == 0
    assert (windows["loss"].count, windows["loss"].high) == (4, 9.0)
    metrics.report({"loss": 3.0})
    _, windows = metrics.numbers(0.0, read=4)  # the one before was: this one's alone
    assert (windows["loss"].count, windows["loss"].total) == (1, 3.0)
    assert metrics.window_step == 20, "the step of the status read: the window's start"
    metrics.written(6, 30)  # not read either: the next one holds it too
    for i in range(FOLD_AT * 3 + 5):  # folded as they come: a fast loop keeps no list
        metrics.report({"loss": float(i % 100)})
    _, windows = metrics.numbers(0.0, read=4)
    assert windows["loss"].count == FOLD_AT * 3 + 5 + 1 and windows["loss"].high == 99.0
    metrics.report({"loss": float("nan")})
    metrics.report({"loss": 1.0})
    _, windows = metrics.numbers(0.0, read=30)
    assert math.isnan(windows["loss"].high) and math.isnan(windows["loss"].low)


# -- arithmetic on the value in effect ------------------------------------------------------


def test_arithmetic_is_worked_out_on_the_value_in_effect():
    values = {"wd": 0.1, "batch": 32}
    targets = {
        name: Target(P.ParamSpec(name, kind, min=1 if kind == "int" else None),
                     lambda n=name: values[n], lambda v, n=name: values.__setitem__(n, v))
        for name, kind in (("wd", "float"), ("batch", "int"))
    }  # fmt: skip
    parts = {"wd": change(0.5, kind=pb.SCALE), "batch": change(2.0, kind=pb.SCALE)}
    done = worked_out(parts, targets)
    assert done["wd"].kind == pb.SET and done["wd"].value.f == pytest.approx(0.05)
    assert done["batch"].value.i == 64 and done["batch"].change_id == parts["batch"].change_id
    with pytest.raises(P.ParamError, match="not a whole number"):
        worked_out({"batch": change(0.3, kind=pb.SCALE)}, targets)
    with pytest.raises(P.ParamError, match="batch"):  # below its min
        worked_out({"batch": change(-40.0, kind=pb.SHIFT)}, targets)
    plain = {"wd": change(0.2)}
    assert worked_out(plain, targets) is plain


# -- a rule firing, in one process --------------------------------------------------------


class Rig:
    """A real relay, mailbox, worker and pump; rules wired as the control plane wires
    them, writing their changes to the relay as the bucket's watch would deliver them."""

    def __init__(self, mailbox, monkeypatch):
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        self.replica = ReplicaView("r0", 0, mailbox)
        self.outbox = Outbox(link=None)
        self.relay, self.pump = wire(JOB, {"r0": self.replica}, self.outbox)
        self.worker = Worker(mailbox)
        self.wd = 0.1
        spec = P.ParamSpec("wd", "float")
        self.worker.add_target(Target(spec, lambda: self.wd, self._put))
        self.fired: list[pb.Outcome] = []
        self.rules = Rules(JOB, {"r0": self.replica}, self._ask, self.fired.append)
        self.pump.on_status, self.pump.on_answer = self.rules.status, self.rules.answered
        self.now = time.monotonic()

    def _put(self, value):
        self.wd = value

    def _ask(self, name, want, replicas):
        for replica in replicas:
            self.relay.take(S.desired_param(JOB, replica, name), "PUT", want.SerializeToString())

    def steps(self, *losses: float) -> None:
        """One status's worth of steps, each reporting a loss, then the status read."""
        for loss in losses:
            self.worker.boundary()
            self.worker.metrics.report({"loss": loss})
        self.now += 1.0
        self.worker.write_status(self.now)
        self.pump.read_back(self.replica, self.now)

    def answers(self) -> list[pb.Outcome]:
        return [
            pb.Outcome.FromString(data)
            for subject, data in self.outbox._messages
            if subject.startswith(f"loomrun.{JOB}.outcomes.")
        ]


def test_a_spike_between_two_statuses_fires_once_and_sets_on_the_value_in_effect(
    mailbox, monkeypatch
):
    rig = Rig(mailbox, monkeypatch)
    problem = rig.rules.put(pb.Rule(name="spike", when="loss.max > 4 * mean(loss.mean, 3)",
                                    then="set wd=wd*0.5", cooldown=5))  # fmt: skip
    assert problem == ""
    for _ in range(4):
        rig.steps(1.0, 1.2, 0.9, 1.1)
    assert not rig.fired
    rig.steps(1.0, 9.0, 1.0, 1.0)  # the last value is back to normal: the max is not
    (fired,) = rig.fired
    assert fired.state == pb.FIRED and fired.name == "spike" and fired.metrics["loss.max"] == 9.0
    line = record(JOB, fired)
    assert line["outcome"] == "fired" and line["metrics"]["loss.max"] == 9.0
    rig.wd = 0.3  # the script moved it meanwhile: the factor applies to this one
    rig.steps(1.0, 9.0)  # met again, on a window that began before its change landed
    assert len(rig.fired) == 1
    (applied,) = [a for a in rig.answers() if a.state == pb.APPLIED]
    assert rig.wd == pytest.approx(0.15) and applied.kind == pb.SCALE
    assert applied.origin == "rule spike" and applied.change_id.startswith(fired.change_id)
    assert P.from_pb(applied.new) == pytest.approx(0.15) and P.from_pb(applied.old) == 0.3
    held = rig.replica.changes.entry("wd")  # held as what it came to, for a restart
    assert held.kind == pb.SET and held.value.f == pytest.approx(0.15)
    rig.steps(30.0)  # a window after the answer, but within the cooldown's 5 steps
    assert len(rig.fired) == 1
    rig.steps(1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    rig.steps(1000.0)  # past the cooldown: fires again
    assert len(rig.fired) == 2 and rig.fired[1].change_id != rig.fired[0].change_id


def test_a_rule_off_under_replay_and_one_removed_fire_no_more(mailbox, monkeypatch):
    rig = Rig(mailbox, monkeypatch)
    rig.rules.on = False
    rig.rules.put(pb.Rule(name="any", when="loss > 0", then="pause"))
    rig.steps(1.0)
    assert not rig.fired
    rig.rules.on = True
    rig.rules.remove("any")
    rig.steps(1.0)
    assert not rig.fired
    assert "rule name" in rig.rules.put(pb.Rule(name="bad name", when="loss > 0", then="pause"))
