"""The optimizer switch in place (runtime.switch), with real torch optimizers: the object the
script holds steps as the new kind from the very step it is switched at, inside that
step's pre-hooks as loomrun's step boundary does it, with an LR scheduler wrapping it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from loomrun.builtin_params import OPTIMIZER_BUILTINS, OPTIMIZERS
from loomrun.runtime import switch as S

S.install()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _grads(model: nn.Module, seed: int) -> None:
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=data)
    model.zero_grad()
    nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()


def _switch_in_step(optimizer, kind: str):
    """Switch inside the next step's global pre-hooks, as loomrun's boundary does."""
    done = []

    def hook(opt, args, kwargs):
        if opt is optimizer and not done:
            done.append(S.switch(opt, kind))

    handle = register_optimizer_step_pre_hook(hook)
    return handle, done


@pytest.mark.parametrize("kind", [k for k in OPTIMIZERS if k != "sgd"])
def test_every_kind_runs_its_own_update_from_the_step_it_is_switched_at(kind):
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.StepLR(sgd, step_size=3, gamma=0.5)
    for seed in range(5):
        _grads(model, seed)
        sgd.step()
        schedule.step()
    twin = copy.deepcopy(model)
    lr = sgd.param_groups[0]["lr"]
    fresh = getattr(torch.optim, OPTIMIZERS[kind])(twin.parameters(), lr=lr)
    for group in fresh.param_groups:
        if "weight_decay" in group:
            group["weight_decay"] = 1e-4  # kept through a switch
    handle, done = _switch_in_step(sgd, kind)
    try:
        _grads(model, 99)
        sgd.step()  # the step the switch happens in: the new kind's update already
    finally:
        handle.remove()
    _grads(twin, 99)
    fresh.step()
    assert type(sgd) is type(fresh) and done[0].new == kind
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(mine, theirs), f"{kind}: not the update of a fresh {kind}"
    _grads(model, 100)
    _grads(twin, 100)
    sgd.step()
    fresh.step()
    schedule.step()  # its wrapper of the step, made around SGD's, runs the new kind
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(mine, theirs), f"{kind}: the second step differs"
    assert sgd.param_groups[0]["lr"] == lr / 2, "lr kept, and the StepLR goes on from it"
    assert ("momentum" in sgd.param_groups[0]) == ("momentum" in OPTIMIZER_BUILTINS[kind])
    assert "nesterov" not in sgd.param_groups[0] and "dampening" not in sgd.defaults
    assert done[0].reset == ["momentum_buffer"], "SGD's state is not the new kind's"
    if "momentum" not in OPTIMIZER_BUILTINS[kind]:
        assert "momentum" in done[0].gone


@pytest.mark.parametrize("kind", [k for k in OPTIMIZERS if k != "sgd"])
def test_every_kind_switches_back_to_the_scripts_own_sgd(kind):
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.8, nesterov=True)
    own = S.hyperparameters(sgd)
    _grads(model, 1)
    sgd.step()
    S.switch(sgd, kind)
    _grads(model, 2)
    sgd.step()
    said = S.switch(sgd, "sgd", own)
    twin = copy.deepcopy(model)
    fresh = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.8, nesterov=True)
    _grads(model, 3)
    _grads(twin, 3)
    sgd.step()
    fresh.step()
    assert type(sgd) is torch.optim.SGD and said.old == kind
    assert {k: v for k, v in sgd.param_groups[0].items() if k != "params"} == {
        k: v for k, v in fresh.param_groups[0].items() if k != "params"
    }
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_adam_and_adamw_keep_their_moments_through_a_switch():
    model = _model()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    _grads(model, 1)
    adam.step()
    moments = [adam.state[p]["exp_avg"].clone() for p in model.parameters()]
    adam.param_groups[0]["betas"] = (0.8, 0.95)
    said = S.switch(adam, "adamw")
    assert said.kept_state and "state kept" in said.sentence()
    assert adam.param_groups[0]["betas"] == (0.8, 0.95), "the moments' own hyperparameters"
    kept = [adam.state[p]["exp_avg"] for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(kept, moments, strict=True))
    assert adam.param_groups[0]["decoupled_weight_decay"] is True, "AdamW's, not Adam's"


def test_the_groups_keep_their_lr_ratio_and_the_wrappers_see_the_same_objects():
    model = _model()
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}]
    sgd = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    state, defaults, param_groups = sgd.state, sgd.defaults, sgd.param_groups
    said = S.switch(sgd, "adamw")
    assert [g["lr"] for g in sgd.param_groups] == [0.1, 0.01]
    assert sgd.state is state and sgd.defaults is defaults and sgd.param_groups is param_groups
    assert said.added["betas"] == (0.9, 0.999) and "momentum" in said.gone
    assert "new: " in said.sentence() and "gone: " in said.sentence()


def test_a_kind_that_is_not_torchs_own_is_refused():
    class Mine(torch.optim.SGD):
        pass

    mine = Mine(_model().parameters(), lr=0.1)
    assert S.kind_of(mine) is None
    with pytest.raises(ValueError, match="not one of torch.optim's optimizers"):
        S.switch(mine, "adam")


def test_a_switch_that_would_break_what_was_made_for_the_old_kind_is_refused_untouched():
    model = _model()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    cycle = torch.optim.lr_scheduler.OneCycleLR(adam, max_lr=0.1, total_steps=100)
    assert "OneCycleLR cycles betas, which sgd does not have" in S.refusal(adam, "sgd", [cycle])
    with pytest.raises(ValueError, match="cycles betas"):
        S.switch(adam, "sgd", schedulers=[cycle])
    assert type(adam) is torch.optim.Adam and "betas" in adam.param_groups[0]
    assert S.refusal(adam, "nadam", [cycle]) == ""
    fused = torch.optim.SGD(_model().parameters(), lr=0.1, fused=True)
    assert "fused" in S.refusal(fused, "nadam") and S.refusal(fused, "adamw") == ""


def test_what_a_switch_resets_of_the_hyperparameters_both_kinds_have_is_said():
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.9)
    said = S.switch(sgd, "rmsprop")
    assert said.changed == {"momentum": 0} and "now: momentum=0" in said.sentence()
    adamw = torch.optim.AdamW(_model().parameters(), lr=0.1, weight_decay=0.1)
    said = S.switch(adamw, "radam")
    assert said.changed == {"decoupled_weight_decay": False}, "an L2 penalty now: said"


def test_back_to_the_scripts_kind_weight_decay_stays_as_it_is_and_momentum_is_its_own():
    """weight_decay is carried through every switch (the value in effect stays); the
    hyperparameters the kinds do not share come back as the script had them."""
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    own = S.hyperparameters(sgd)
    S.switch(sgd, "adam")
    assert sgd.param_groups[0]["weight_decay"] == 0.01
    sgd.param_groups[0]["weight_decay"] = 0.5  # written meanwhile (by a change, say)
    S.switch(sgd, "sgd", own)
    assert sgd.param_groups[0]["weight_decay"] == 0.5
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["dampening"] == 0
