"""The optimizer hooks and the built-ins with real torch optimizers and every LR scheduler
class torch ships: a steered value is the one each step runs with, whoever else writes it.

The worker here is a real runtime Worker on its own mailbox (no supervisor owns it), with
the real global optimizer hooks installed, as in a worker process. What a step ran with
is read by a step post-hook of the optimizer's own, right after the step."""

from __future__ import annotations

import gc
import inspect

import pytest
import torch
import torch.optim.lr_scheduler as L

from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb
from loomrun.desired import DesiredConfig
from loomrun.runtime.optim import Optimizers, track_schedulers
from loomrun.runtime.worker import Worker


@pytest.fixture
def optimizers(mailbox):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    found = Optimizers(Worker(mailbox))
    handle = register_optimizer_step_pre_hook(found.pre_step)
    init, last = L.LRScheduler.__init__, L.LRScheduler.get_last_lr
    track_schedulers(L.LRScheduler, found)
    yield found
    L.LRScheduler.__init__, L.LRScheduler.get_last_lr = init, last
    handle.remove()


def two_groups(lr=0.1, optimizer=torch.optim.SGD, **kwargs):
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    return optimizer([{"params": [a]}, {"params": [b], "lr": lr / 10}], lr=lr, **kwargs)


def recording(optimizer, key="lr") -> list:
    """Every step's values of `key` in each group, as the step ran with them."""
    seen: list = []
    optimizer.register_step_post_hook(
        lambda o, args, kwargs: seen.append([plain(g.get(key)) for g in o.param_groups])
    )
    return seen


def plain(value):
    return value.item() if torch.is_tensor(value) else value


def train(optimizer, steps: int, scheduler=None, writer=None) -> None:
    for _ in range(steps):
        if writer is not None:
            writer(optimizer)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        optimizer.step()
        if scheduler is not None:
            if isinstance(scheduler, L.ReduceLROnPlateau):
                scheduler.step(1.0)  # a loss that never improves: it reduces, every time
            else:
                scheduler.step()


def change_of(worker: Worker, desired: DesiredConfig, values: dict, change_id: str) -> None:
    """One change of several parameters, into the worker's own mailbox."""
    for name, value in values.items():
        want = pb.DesiredParam(change_id=change_id, together=sorted(values))
        want.value.CopyFrom(P.to_pb(value))
        desired.take(name, want)
    worker.mailbox.desired.write(desired.state)


def change(worker: Worker, desired: DesiredConfig, name: str, value=None, kind=pb.SET) -> str:
    """Write a change into the worker's own mailbox, as its supervisor would."""
    want = pb.DesiredParam(change_id=f"c{desired.state.version + 1}", kind=kind)
    if value is not None:
        want.value.CopyFrom(P.to_pb(value))
    desired.take(name, want)
    worker.mailbox.desired.write(desired.state)
    return want.change_id


def answer(worker: Worker, change_id: str) -> pb.Outcome | None:
    _, acks = worker.mailbox.acks.read()
    found = [o for o in (acks.recent if acks else ()) if o.change_id == change_id]
    return found[-1] if found else None


def test_a_replaced_optimizer_hands_the_step_count_to_the_next(optimizers):
    first = two_groups()
    train(first, 3)
    assert optimizers.worker.step == 3
    del first
    gc.collect()
    second = two_groups(lr=0.5)
    train(second, 2)
    assert optimizers.worker.step == 5, "the new optimizer counts the steps once the old is gone"
    assert optimizers.get("lr") == 0.5


def test_lr_keeps_the_ratio_and_lr_n_sets_one_group(optimizers):
    optimizer = two_groups(lr=0.1)
    used, momenta = recording(optimizer), recording(optimizer, "momentum")
    train(optimizer, 1)
    assert {"lr", "lr.0", "lr.1", "momentum"} <= set(optimizers.worker.targets)
    optimizers.put("lr", 0.3)
    assert optimizers.get("lr") == pytest.approx(0.3) and optimizers.own("lr") == 0.1
    train(optimizer, 1)
    assert used[-1] == pytest.approx([0.3, 0.03])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.3, 0.03]), "as in effect"
    assert optimizers.own("lr") == 0.1 and optimizers.own("lr.1") == 0.01
    optimizers.put("lr.1", 0.05)
    optimizers.put("momentum", 0.5)
    train(optimizer, 1)
    assert used[-1] == pytest.approx([0.3, 0.05])
    assert optimizers.get("lr.1") == pytest.approx(0.05)
    assert momenta[-1] == [0.5, 0.5] and optimizers.held("momentum")
    optimizers.unset("lr.1")
    train(optimizer, 1)
    assert used[-1] == pytest.approx([0.3, 0.03]), "lr's rule again for group 1"
    for name in ("lr", "momentum"):
        optimizers.unset(name)
    train(optimizer, 1)
    assert used[-1] == [0.1, 0.01] and momenta[-1] == [0, 0]
    assert not optimizer._optimizer_step_pre_hooks, "nothing steered: no hook of loomrun's"
    assert len(optimizer._optimizer_step_post_hooks) == 2, "the two recordings: no more"
    assert not optimizers.steering


def test_the_value_asked_for_is_exactly_the_one_in_effect(optimizers):
    """0.1 * (0.0555 / 0.1) is 0.055499999999999994: while the schedule stands where it was,
    the step runs with exactly the value the user typed, and `get` shows it."""
    optimizer = two_groups(lr=0.1)
    used = recording(optimizer)
    train(optimizer, 1)
    for asked in (0.0555, 0.0421, 0.0333, 0.007):
        optimizers.put("lr", asked)
        train(optimizer, 1)
        assert used[-1][0] == asked and optimizers.get("lr") == asked
        assert used[-1][1] == pytest.approx(asked / 10), "group 1 keeps its ratio"


def test_a_single_group_has_no_lr_n(optimizers):
    weight = torch.nn.Parameter(torch.ones(1))
    train(torch.optim.Adam([weight], lr=0.1), 1)
    assert "lr.0" not in optimizers.worker.targets and "betas" in optimizers.worker.targets


# Every scheduler class in torch.optim.lr_scheduler that keeps lr state, built for a test.
SCHEDULERS = {
    "LambdaLR": lambda o: L.LambdaLR(o, lambda s: 1.0 / (1 + 0.1 * s)),
    "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, lambda s: 0.95),
    "StepLR": lambda o: L.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[4, 9, 14], gamma=0.5),
    "ConstantLR": lambda o: L.ConstantLR(o, factor=0.5, total_iters=12),
    "LinearLR": lambda o: L.LinearLR(o, start_factor=0.2, total_iters=16),
    "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.9),
    "SequentialLR": lambda o: L.SequentialLR(
        o, [L.ConstantLR(o, factor=0.5, total_iters=4), L.ExponentialLR(o, gamma=0.9)], [6]
    ),
    "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=30, power=2.0),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=12),
    "ChainedScheduler": lambda o: L.ChainedScheduler(
        [L.ConstantLR(o, factor=0.5, total_iters=8), L.ExponentialLR(o, gamma=0.9)]
    ),
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, factor=0.5, patience=1),
    "CyclicLR": lambda o: L.CyclicLR(o, base_lr=[0.01, 0.001], max_lr=[0.1, 0.01], step_size_up=4),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=5),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=[0.1, 0.01], total_steps=80),
}


def test_every_scheduler_torch_ships_is_covered():
    shipped = {
        name for name, cls in vars(L).items()
        if inspect.isclass(cls) and issubclass(cls, L.LRScheduler)
        and cls not in (L.LRScheduler, L._LRScheduler)
    }  # fmt: skip
    assert shipped <= set(SCHEDULERS), f"add to SCHEDULERS: {sorted(shipped - set(SCHEDULERS))}"


def schedule(name: str, steps: int) -> list[list[float]]:
    """What `name` gives each group at each step, with no change."""
    reference = two_groups(lr=0.1)
    used = recording(reference)
    train(reference, steps, SCHEDULERS[name](reference))
    del reference
    gc.collect()  # the runtime must know only the steered optimizer
    return used


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_live_lr_change_scales_the_schedule(optimizers, name):
    """After lr is scaled by k at step n, every later step of every group runs with k times
    what the same schedule gives without the change, and unset gives the schedule back."""
    k, before, after = 3.0, 7, 25
    expected = schedule(name, before + 2 * after)
    steered = two_groups(lr=0.1)
    used = recording(steered)
    scheduler = SCHEDULERS[name](steered)
    train(steered, before, scheduler)
    optimizers.put("lr", optimizers.get("lr") * k)
    train(steered, after, scheduler)
    for step in range(before, before + after):
        assert used[step] == pytest.approx([k * lr for lr in expected[step]], rel=1e-9), step
    last = scheduler.get_last_lr()
    want = [k * optimizers.own(f"lr.{i}") for i in range(2)]
    assert last == pytest.approx(want, rel=1e-9), "get_last_lr says what the steps run with"
    assert [g["lr"] for g in steered.param_groups] == pytest.approx(want, rel=1e-9)
    optimizers.unset("lr")
    train(steered, after, scheduler)
    for step in range(before + after, before + 2 * after):
        assert used[step] == pytest.approx(expected[step], rel=1e-12), step


@pytest.mark.parametrize("name", ["LambdaLR", "StepLR", "OneCycleLR", "ReduceLROnPlateau"])
def test_a_held_lr_is_exactly_the_value_whatever_the_schedule(optimizers, name):
    expected = schedule(name, 30)
    steered = two_groups(lr=0.1)
    used = recording(steered)
    scheduler = SCHEDULERS[name](steered)
    train(steered, 5, scheduler)
    optimizers.put("lr", 0.04, hold=True)
    train(steered, 20, scheduler)
    for step in range(5, 25):
        ratio = expected[step][1] / expected[step][0]
        assert used[step][0] == 0.04, "exactly the value held"
        assert used[step][1] == pytest.approx(0.04 * ratio), "the other group keeps its ratio"
    assert optimizers.held("lr") and optimizers.own("lr") == pytest.approx(expected[25][0])


def test_floors_the_user_gave_stay_absolute(optimizers):
    optimizer = two_groups(lr=0.1)
    used = recording(optimizer)
    scheduler = L.CosineAnnealingLR(optimizer, T_max=20, eta_min=0.005)
    train(optimizer, 2, scheduler)
    optimizers.put("lr", optimizers.get("lr") / 10)
    train(optimizer, 18, scheduler)
    assert used[-1][0] == 0.005, "the schedule times new/old, above the floor eta_min"
    assert used[3][0] > 0.005


def nanogpt_lr(it: int) -> float:
    """Cosine with a linear warmup, as a nanoGPT-style script computes it."""
    import math

    warmup, decay, top, bottom = 5, 60, 6e-4, 6e-5
    if it < warmup:
        return top * (it + 1) / (warmup + 1)
    ratio = min(1.0, (it - warmup) / (decay - warmup))
    return bottom + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (top - bottom)


def test_a_script_that_writes_its_own_lr_every_step_is_scaled_not_undone(optimizers):
    optimizer = two_groups(lr=6e-4, optimizer=torch.optim.AdamW)
    used = recording(optimizer)
    step = [0]

    def writes_lr(o):
        lr = nanogpt_lr(step[0])
        for group in o.param_groups:
            group["lr"] = lr
        step[0] += 1

    train(optimizer, 10, writer=writes_lr)
    optimizers.put("lr", 2e-4)
    k = 2e-4 / nanogpt_lr(9)
    train(optimizer, 40, writer=writes_lr)
    for it in range(10, 50):
        assert used[it] == pytest.approx([k * nanogpt_lr(it)] * 2, rel=1e-12)
    assert optimizers.own("lr") == nanogpt_lr(49), "get's 'script' value: its lr now"


def test_a_relative_writer_is_scaled_once_not_compounded(optimizers):
    optimizer = two_groups(lr=0.1)
    used = recording(optimizer)

    def decays(o):
        for group in o.param_groups:
            group["lr"] *= 0.9

    train(optimizer, 3, writer=decays)
    optimizers.put("lr", optimizers.get("lr") * 2)
    train(optimizer, 10, writer=decays)
    for it in range(3, 13):
        assert used[it] == pytest.approx([2 * 0.1 * 0.9 ** (it + 1), 2 * 0.01 * 0.9 ** (it + 1)])


def test_a_write_of_the_steered_value_itself_is_still_the_scripts(optimizers):
    """Told apart by identity: a schedule landing on the steered value is not mistaken for
    loomrun's own (a comparison of values would keep 0.3 instead of scaling it)."""
    optimizer = two_groups(lr=0.1)
    used = recording(optimizer)
    train(optimizer, 1)
    optimizers.put("lr", 0.3)
    train(optimizer, 1)
    assert used[-1][0] == pytest.approx(0.3)

    def lands_on_it(o):
        o.param_groups[0]["lr"] = float("0.3")  # a new object equal to the steered value

    train(optimizer, 1, writer=lands_on_it)
    assert used[-1][0] == pytest.approx(0.9)


def test_a_scheduler_on_a_wrapper_of_the_optimizer_is_followed(optimizers):
    """accelerate and Lightning hand schedulers a wrapper that shares the param groups."""

    class Wrapper(torch.optim.Optimizer):  # as accelerate's AcceleratedOptimizer is
        def __init__(self, inner):
            self.optimizer = inner

        @property
        def param_groups(self):
            return self.optimizer.param_groups

        @param_groups.setter
        def param_groups(self, value):
            self.optimizer.param_groups = value

        @property
        def defaults(self):
            return self.optimizer.defaults

        def step(self, closure=None):
            return self.optimizer.step(closure)

    inner = two_groups(lr=0.1)
    used = recording(inner)
    wrapped = Wrapper(inner)
    scheduler = L.LambdaLR(wrapped, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        for g in inner.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        wrapped.step()
        scheduler.step()
    optimizers.put("lr", optimizers.get("lr") * 4)
    for s in range(3, 8):
        for g in inner.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        wrapped.step()
        assert used[-1] == pytest.approx([0.4 / (1 + s), 0.04 / (1 + s)])
        scheduler.step()
        assert scheduler.get_last_lr() == pytest.approx([0.4 / (2 + s), 0.04 / (2 + s)])


def test_a_wrapper_that_writes_lr_before_the_inner_step_is_held(optimizers):
    class Warmup:
        def __init__(self, inner):
            self.inner, self.t = inner, 0

        def step(self):
            self.t += 1
            for g in self.inner.param_groups:
                g["lr"] = 0.01 * self.t
            self.inner.step()

    inner = two_groups(lr=0.1)
    used = recording(inner)
    wrapper = Warmup(inner)
    for _ in range(2):
        train_one(inner, wrapper.step)
    optimizers.put("lr", 0.06)  # 3x the 0.02 in effect
    for t in range(3, 8):
        train_one(inner, wrapper.step)
        assert used[-1] == pytest.approx([0.03 * t, 0.03 * t])


def train_one(optimizer, step) -> None:
    for g in optimizer.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    step()


class OwnSchedule(torch.optim.Optimizer):
    """Sets lr inside its own step, after the pre-hook, from its own state."""

    def __init__(self, params, lr=0.1, writes=True):
        super().__init__(params, {"lr": lr})
        self.t, self.writes = 0, writes

    @torch.no_grad()
    def step(self, closure=None):
        self.t += 1
        for group in self.param_groups:
            if self.writes:
                group["lr"] = 0.1 / self.t
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])


def test_an_optimizer_that_writes_lr_in_its_step_answers_overridden(optimizers):
    worker, desired = optimizers.worker, DesiredConfig()
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = OwnSchedule([param])
    train(optimizer, 3)
    change_id = change(worker, desired, "lr", 0.5)
    train(optimizer, 1)
    outcome = answer(worker, change_id)
    assert outcome is not None and outcome.state == pb.OVERRIDDEN
    assert outcome.step == 4 and "lr=0.025" in outcome.reason, outcome.reason
    assert worker.targets["lr"].get() == 0.025, "what is in effect, not what was asked"
    train(optimizer, 1)
    assert len([o for o in worker.mailbox.acks.read()[1].recent if o.name == "lr"]) == 1


def test_a_held_value_overridden_later_ends_with_a_record(optimizers):
    worker, desired = optimizers.worker, DesiredConfig()
    optimizer = OwnSchedule([torch.nn.Parameter(torch.ones(2))], writes=False)
    train(optimizer, 2)
    change_id = change(worker, desired, "lr", 0.05)
    train(optimizer, 1)
    assert answer(worker, change_id).state == pb.APPLIED
    optimizer.writes = True  # from its 4th step on
    train(optimizer, 1)
    ended = answer(worker, change_id)
    assert ended.state == pb.OVERRIDDEN and ended.ended and ended.step == 4
    assert P.from_pb(ended.new) == 0.025 and worker.targets["lr"].get() == 0.025


def test_unset_through_the_mailbox_gives_the_schedule_back(optimizers):
    worker, desired = optimizers.worker, DesiredConfig()
    optimizer = two_groups(lr=0.1)
    used = recording(optimizer)
    scheduler = L.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    train(optimizer, 2, scheduler)
    held = change(worker, desired, "lr", 0.5, kind=pb.HOLD)
    train(optimizer, 3, scheduler)
    assert answer(worker, held).state == pb.APPLIED and answer(worker, held).kind == pb.HOLD
    assert [u[0] for u in used[2:5]] == [0.5, 0.5, 0.5]
    unset = change(worker, desired, "lr", kind=pb.UNSET)
    train(optimizer, 2, scheduler)
    outcome = answer(worker, unset)
    assert outcome.state == pb.APPLIED and outcome.kind == pb.UNSET
    assert P.from_pb(outcome.old) == 0.5 and P.from_pb(outcome.new) == pytest.approx(0.1 / 6)
    assert [u[0] for u in used[5:7]] == pytest.approx([0.1 / 6, 0.1 / 7])


def test_adafactor_with_its_own_lr_is_refused_with_the_reason(optimizers):
    from transformers.optimization import Adafactor

    worker, desired = optimizers.worker, DesiredConfig()
    param = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = Adafactor([param], lr=None, relative_step=True, warmup_init=True)
    train(optimizer, 2)
    change_id = change(worker, desired, "lr", 0.01)
    train(optimizer, 1)
    outcome = answer(worker, change_id)
    assert outcome.state == pb.REJECTED and "relative_step=True" in outcome.reason


def test_a_tensor_lr_is_kept_too(optimizers):
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([param], lr=torch.tensor(0.01))
    used = recording(optimizer)
    train(optimizer, 1)
    optimizers.put("lr", 0.02, hold=True)
    train(optimizer, 2)
    assert [float(u[0]) for u in used[1:]] == pytest.approx([0.02, 0.02])
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(0.01)


def test_the_scripts_own_lr_is_the_one_it_gave_before_any_schedule(optimizers):
    optimizer = two_groups(lr=0.1)
    L.LambdaLR(optimizer, lambda s: min(1.0, s / 10))  # a warm-up: lr starts at 0
    train(optimizer, 1)
    targets = optimizers.worker.targets
    assert targets["lr"].spec.default == 0.1 and targets["lr.1"].spec.default == 0.01


def test_an_lr_that_is_no_plain_number_steps_all_the_same(optimizers):
    import numpy as np

    optimizer = two_groups(lr=np.float32(0.1))
    train(optimizer, 3)  # no error from the hook: the value is only left out of the schema
    assert optimizers.worker.step == 3 and optimizers.worker.targets["lr"].spec.default is None


def test_several_optimizers_answer_after_the_one_that_steps_with_the_change(optimizers):
    """lr goes to every group of every optimizer: the answer waits for each to step, so an
    optimizer that writes lr in its own step makes it overridden, never applied."""
    worker, desired = optimizers.worker, DesiredConfig()
    first = two_groups(lr=0.1)
    second = OwnSchedule([torch.nn.Parameter(torch.ones(2))], writes=False)
    train(first, 2)
    train(second, 2)
    change_id = change(worker, desired, "lr", 0.2)
    train(first, 1)
    assert answer(worker, change_id) is None, "not answered before every optimizer stepped"
    second.writes = True
    train(second, 1)
    assert answer(worker, change_id).state == pb.OVERRIDDEN


def test_a_step_that_raises_leaves_no_compounding(optimizers):
    """The step runs with a plain float (an InEffect's arithmetic would cost the optimizer
    a Python call per operation): left in the group by a step that raised, it is still
    known as loomrun's, and the scheduler after it computes from the script's value."""
    optimizer = two_groups(lr=0.1)
    used = recording(optimizer)
    scheduler = L.ExponentialLR(optimizer, gamma=0.5)
    train(optimizer, 1)
    optimizers.put("lr", 0.2)  # the script's 0.1, doubled
    failing = [True]

    def fails_once(o, args, kwargs):
        if failing.pop() if failing else False:
            raise RuntimeError("out of memory, retried by the script")

    handle = optimizer.register_step_pre_hook(fails_once)
    with pytest.raises(RuntimeError):
        train(optimizer, 1)
    handle.remove()
    assert type(optimizer.param_groups[0]["lr"]) is float, "the step's plain value, left"
    scheduler.step()  # the script goes on: its schedule, then a step
    train(optimizer, 2, scheduler)
    assert used[-2] == pytest.approx([0.1, 0.01]) and used[-1] == pytest.approx([0.05, 0.005])


def test_new_param_groups_from_load_state_dict_end_the_change_with_a_record(optimizers):
    worker, desired = optimizers.worker, DesiredConfig()
    optimizer = two_groups(lr=0.1)
    train(optimizer, 1)
    saved = optimizer.state_dict()
    change_id = change(worker, desired, "lr", 0.3)
    train(optimizer, 1)
    assert answer(worker, change_id).state == pb.APPLIED
    optimizer.load_state_dict(saved)  # new group dicts, with lr 0.1
    train(optimizer, 1)
    worker.write_status(0.0)
    ended = answer(worker, change_id)
    assert ended.state == pb.OVERRIDDEN and ended.ended and "made anew" in ended.reason
    assert worker.targets["lr"].get() == 0.1 and worker.targets["lr"].own() is None


def test_a_checkpoint_of_a_steered_optimizer_holds_plain_floats(optimizers, tmp_path):
    optimizer = two_groups(lr=0.1)
    train(optimizer, 1)
    optimizers.put("lr", 0.3)
    train(optimizer, 1)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    loaded = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert [type(g["lr"]) for g in loaded["param_groups"]] == [float, float]
    assert loaded["param_groups"][0]["lr"] == pytest.approx(0.3)


def test_accelerate_prepared_optimizer_and_scheduler_are_followed(optimizers):
    from accelerate import Accelerator

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    used = recording(optimizer)
    scheduler = L.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    prepared, schedule = Accelerator(cpu=True).prepare(optimizer, scheduler)
    for s in range(8):
        if s == 3:
            optimizers.put("lr", optimizers.get("lr") * 4)
        model(torch.ones(1, 2)).sum().backward()
        prepared.step()
        schedule.step()
        prepared.zero_grad()
        want = 0.1 / (1 + s) * (4 if s >= 3 else 1)
        assert used[-1] == pytest.approx([want]), s
    assert schedule.get_last_lr() == pytest.approx([0.4 / 9])


def test_an_inner_copy_of_the_groups_is_not_scaled_twice(optimizers):
    """torch's ZeroRedundancyOptimizer steps an optimizer of its own over copies of its
    groups: the change is kept in the outer groups only, and the inner step runs with it."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from loomrun.launch import free_port

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        param = torch.nn.Parameter(torch.ones(2))
        zero = ZeroRedundancyOptimizer([param], optimizer_class=torch.optim.SGD, lr=0.1)
        used = recording(zero.optim)
        train(zero, 2)
        optimizers.put("lr", 0.3)
        train(zero, 2)
        assert used[-2] == pytest.approx([0.3]) and used[-1] == pytest.approx([0.3])
        assert optimizers.get("lr") == pytest.approx(0.3)
    finally:
        dist.destroy_process_group()


def test_a_scaled_tensor_lr(optimizers):
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([param], lr=torch.tensor(0.01))
    used = recording(optimizer)
    scheduler = L.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    train(optimizer, 2, scheduler)
    optimizers.put("lr", optimizers.get("lr") * 2)
    train(optimizer, 2, scheduler)
    assert used[2] == pytest.approx([0.02 / 3], rel=1e-6)
    assert used[3] == pytest.approx([0.02 / 4], rel=1e-6)


def test_a_second_set_while_steered_takes_the_scripts_value_of_this_step(optimizers):
    """The script wrote its lr for this step already: new/old is taken from that, so the
    same `set` twice is the same value in effect, not a ratio of a stale one."""
    optimizer = two_groups(lr=6e-4, optimizer=torch.optim.AdamW)
    used = recording(optimizer)
    step = [0]

    def writes_lr(o):
        for group in o.param_groups:
            group["lr"] = nanogpt_lr(step[0])
        step[0] += 1

    train(optimizer, 3, writer=writes_lr)
    writes_lr(optimizer)  # the script's value for the next step, before its boundary
    step[0] -= 1
    for _ in range(2):
        optimizers.put("lr", 2e-4)
        assert optimizers.get("lr") == pytest.approx(2e-4)
    train(optimizer, 1, writer=writes_lr)
    assert used[-1] == pytest.approx([2e-4, 2e-4])


@pytest.mark.parametrize(
    "writer",
    [
        lambda lr: round(lr * 0.5, 12),
        lambda lr: __import__("numpy").float64(0.5) * lr,
        lambda lr: lr**1.0 * 0.5,
        lambda lr: lr // 1e-9 * 1e-9 * 0.5,
    ],
    ids=["round", "numpy", "pow", "floordiv"],
)
def test_relative_writes_through_other_arithmetic_are_not_compounded(optimizers, writer):
    optimizer = two_groups(lr=0.1)
    used = recording(optimizer)
    train(optimizer, 1)
    optimizers.put("lr", 0.2)

    def halves(o):
        for group in o.param_groups:
            group["lr"] = writer(group["lr"])

    train(optimizer, 3, writer=halves)
    assert [u[0] for u in used[1:]] == pytest.approx([0.1, 0.05, 0.025], rel=1e-6)


def test_a_scheduler_made_while_steered_takes_the_scripts_values(optimizers):
    optimizer = two_groups(lr=0.1)
    used = recording(optimizer)
    train(optimizer, 1)
    optimizers.put("lr", 0.3)
    scheduler = L.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    assert scheduler.base_lrs == pytest.approx([0.1, 0.01]) and type(scheduler.base_lrs[0]) is float
    train(optimizer, 2, scheduler)
    optimizers.unset("lr")
    train(optimizer, 1, scheduler)
    assert used[-1] == pytest.approx([0.1 / 3, 0.01 / 3]), "the schedule, unscaled"
    assert type(optimizer.param_groups[0]["lr"]) is float


def test_an_optimizer_that_steps_now_and_then_does_not_hold_the_answer(optimizers):
    worker, desired = optimizers.worker, DesiredConfig()
    often, seldom = two_groups(lr=0.1), two_groups(lr=0.1)
    train(often, 1)
    train(seldom, 1)
    change_id = change(worker, desired, "lr", 0.2)
    train(often, 1)
    assert answer(worker, change_id) is None
    train(often, 1)  # the next step's end: seldom is not waited for
    assert answer(worker, change_id).state == pb.APPLIED


def test_a_refused_change_leaves_no_hook(optimizers):
    optimizer = two_groups(lr=0.1)

    def warms_up_from_0(o):  # the script's own schedule, at 0 now (no scheduler's base)
        for group in o.param_groups:
            group["lr"] = 0.0

    train(optimizer, 1, writer=warms_up_from_0)
    with pytest.raises(P.ParamError, match="is 0 in the script's schedule now"):
        optimizers.put("lr", 0.2)
    assert not optimizer._optimizer_step_pre_hooks and not optimizers.steering


def test_momentum_steered_up_from_zero_on_rmsprop_finds_its_buffers(optimizers):
    """RMSprop makes momentum buffers at its first step only when momentum is above 0."""
    optimizer = two_groups(optimizer=torch.optim.RMSprop, momentum=0.0)
    train(optimizer, 2)
    cid = change(optimizers.worker, DesiredConfig(), "momentum", 0.5)
    train(optimizer, 3)  # a KeyError in RMSprop's step, without the buffers
    assert answer(optimizers.worker, cid).state == pb.APPLIED
    assert all("momentum_buffer" in state for state in optimizer.state.values())


def test_a_switch_and_its_hyperparameters_are_one_change_and_unset_goes_back(optimizers):
    from loomrun.runtime import switch

    switch.install()
    optimizer = two_groups(momentum=0.7)
    train(optimizer, 2)
    worker = optimizers.worker
    assert worker.targets["optimizer"].get() == "sgd" and "betas" not in worker.targets
    desired = DesiredConfig()
    change_of(worker, desired, {"optimizer": "adamw", "betas": [0.8, 0.9]}, "c1")
    betas = recording(optimizer, "betas")
    train(optimizer, 2)
    outcome = answer(worker, "c1")
    assert outcome.state == pb.APPLIED and type(optimizer) is torch.optim.AdamW
    assert [p.name for p in outcome.parts] == ["betas", "optimizer"]
    assert not outcome.parts[0].HasField("old"), "SGD had no betas before this change"
    assert betas[:2] == [[(0.8, 0.9), (0.8, 0.9)]] * 2, "from the very step it landed at"
    assert "momentum" not in worker.targets and "betas" in worker.targets
    cid = change(worker, desired, "optimizer", kind=pb.UNSET)
    train(optimizer, 1)
    assert answer(worker, cid).state == pb.APPLIED and type(optimizer) is torch.optim.SGD
    assert [g["momentum"] for g in optimizer.param_groups] == [0.7, 0.7], "the script's own"
    assert "betas" not in worker.targets and "momentum" in worker.targets


def test_a_switch_ends_what_it_takes_away_and_unset_brings_back_the_scripts_own(optimizers):
    """momentum steered under SGD: the switch to Adam ends it (its own record); going back,
    the script's own momentum returns, not the value loomrun had steered."""
    from loomrun.runtime import switch

    switch.install()
    optimizer = two_groups(momentum=0.9)
    train(optimizer, 2)
    worker, desired = optimizers.worker, DesiredConfig()
    steered = change(worker, desired, "momentum", 0.5)
    train(optimizer, 2)
    assert answer(worker, steered).state == pb.APPLIED
    switched = change(worker, desired, "optimizer", "adam")
    train(optimizer, 2)
    assert answer(worker, switched).state == pb.APPLIED
    ended = answer(worker, steered)
    assert ended.state == pb.OVERRIDDEN and ended.ended and "took it away" in ended.reason
    back = change(worker, desired, "optimizer", kind=pb.UNSET)
    train(optimizer, 1)
    assert answer(worker, back).state == pb.APPLIED
    assert [g["momentum"] for g in optimizer.param_groups] == [0.9, 0.9], "the script's own"


def test_a_switch_whose_lr_the_schedule_refuses_changes_nothing(optimizers):
    """The script's lr is 0: lr has no ratio. The whole change is refused before the switch."""
    from loomrun.runtime import switch

    switch.install()
    optimizer = two_groups(lr=0.0, momentum=0.9)
    train(optimizer, 2)
    buffers = [id(s["momentum_buffer"]) for s in optimizer.state.values()]
    change_of(optimizers.worker, DesiredConfig(), {"optimizer": "adamw", "lr": 3e-4}, "c1")
    train(optimizer, 1)
    outcome = answer(optimizers.worker, "c1")
    assert outcome.state == pb.REJECTED and "use `--hold`" in outcome.reason
    assert type(optimizer) is torch.optim.SGD
    assert [id(s["momentum_buffer"]) for s in optimizer.state.values()] == buffers


def test_a_switch_says_old_values_from_before_it_and_no_default_that_is_not_in_effect(
    optimizers,
):
    """momentum held at 0.5 under SGD: RMSprop's default momentum (0) is not in effect, so
    the answer does not say so; a part's old value is the one before the change."""
    from loomrun.runtime import switch

    switch.install()
    optimizer = two_groups(momentum=0.9)
    train(optimizer, 2)
    worker, desired = optimizers.worker, DesiredConfig()
    held = change(worker, desired, "momentum", 0.5)
    train(optimizer, 2)
    assert answer(worker, held).state == pb.APPLIED
    change_of(worker, desired, {"optimizer": "rmsprop", "weight_decay": 0.1}, "c9")
    momenta = recording(optimizer, "momentum")
    train(optimizer, 1)
    outcome = answer(worker, "c9")
    assert outcome.state == pb.APPLIED, outcome.reason
    assert {p.name: P.from_pb(p.old) for p in outcome.parts} == {
        "optimizer": "sgd",
        "weight_decay": 0,
    }
    assert "momentum=0" not in outcome.reason, "0.5 is in effect, not RMSprop's default"
    assert momenta == [[0.5, 0.5]], "the held momentum, through the switch"
