"""The training state a snapshot holds, found with no code, and put back in place."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from loomrun.runtime.snapshots import parse_bytes
from loomrun.runtime.trainstate import (
    Finder,
    StateError,
    capture,
    checkpoint,
    restore,
    write_checkpoint,
)


def _setup(kind=torch.optim.AdamW):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1)
    )
    optimizer = kind(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")
    return model, optimizer, scheduler, scaler


def _train(model, optimizer, scheduler, scaler, steps):
    for _ in range(steps):
        x = torch.randn(16, 6)
        loss = model(x).pow(2).mean() + random.random() * 0 + float(np.random.rand()) * 0
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()


def _fingerprint(model, optimizer, scheduler):
    tensors = [t.clone() for t in [*model.parameters(), *model.buffers()]]
    state = [
        {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
        for p in model.parameters()
        if p in optimizer.state
    ]
    return (
        tensors, state, optimizer.param_groups[0]["lr"], scheduler.last_epoch,
        torch.get_rng_state(), random.random(), float(np.random.rand()),
    )  # fmt: skip


def _same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    assert len(a[1]) == len(b[1])
    for x, y in zip(a[1], b[1], strict=True):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a[2:4] == b[2:4]
    assert torch.equal(a[4], b[4]) and a[5:] == b[5:]


def test_rollback_puts_every_part_back_bitwise():
    model, optimizer, scheduler, scaler = _setup()
    _train(model, optimizer, scheduler, scaler, 4)
    finder = Finder()
    found = finder.find([optimizer], [scheduler])
    assert found.modules == [model]
    assert found.scalers == [scaler]
    saved = capture(found, None)
    # What the state is at the snapshot, and what training from it gives.
    random_state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    before = _fingerprint(model, optimizer, scheduler)
    random.setstate(random_state[0])
    np.random.set_state(random_state[1])
    torch.set_rng_state(random_state[2])
    _train(model, optimizer, scheduler, scaler, 5)
    first_run = _fingerprint(model, optimizer, scheduler)
    assert not torch.equal(first_run[0][0], before[0][0])
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    scale = scaler.get_scale()
    scaler.update(new_scale=scale / 4)
    assert restore(saved, None, [optimizer]) == ([], [scheduler])
    assert scaler.get_scale() == scale, "the GradScaler's scale back too"
    assert all(p.grad is None for p in model.parameters())
    _same(_fingerprint(model, optimizer, scheduler), before)
    # From the restored state (RNG included), the same steps give the same result.
    assert restore(saved, None)[0] == []
    _train(model, optimizer, scheduler, scaler, 5)
    _same(_fingerprint(model, optimizer, scheduler), first_run)


def test_a_state_taken_before_the_first_step_has_no_optimizer_state():
    model, optimizer, scheduler, scaler = _setup()
    saved = capture(Finder().find([optimizer], [scheduler]), None)
    _train(model, optimizer, scheduler, scaler, 2)
    assert optimizer.state
    restore(saved, None)
    assert not optimizer.state
    assert scheduler.last_epoch == 0


def test_a_switched_optimizer_starts_fresh_and_says_so():
    model, optimizer, scheduler, scaler = _setup(torch.optim.SGD)
    _train(model, optimizer, scheduler, scaler, 2)
    saved = capture(Finder().find([optimizer], [scheduler]), None)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.__class__ = torch.optim.Adam  # as `set optimizer=adam` does, in place
    optimizer.state[next(model.parameters())] = {"exp_avg": torch.zeros(1)}
    optimizer.param_groups[0]["lr"] = 0.5
    notes, _ = restore(saved, None)
    assert any("starts fresh" in note for note in notes)
    assert not optimizer.state
    assert optimizer.param_groups[0]["lr"] == lr, "the snapshot's lr, carried through a switch"


def test_a_tensor_resized_since_is_refused_with_nothing_changed():
    model, optimizer, scheduler, scaler = _setup()
    saved = capture(Finder().find([optimizer], [scheduler]), None)
    weight = model[0].weight
    kept = model[2].weight.clone()
    with torch.no_grad():
        model[2].weight.add_(1.0)
        weight.data = torch.zeros(3, 3)
    with pytest.raises(StateError, match="shape"):
        restore(saved, None)
    assert torch.equal(model[2].weight, kept + 1.0)


def test_tracked_objects_and_modules_no_optimizer_trains():
    model, optimizer, scheduler, scaler = _setup()
    ema = torch.nn.Linear(6, 8)

    class Counter:
        def __init__(self):
            self.n = 0

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    counter = Counter()
    finder = Finder()
    assert ema not in finder.find([optimizer], [scheduler]).modules
    finder.track(ema, counter)
    found = finder.find([optimizer], [scheduler])
    assert ema in found.modules and counter in found.objects
    saved = capture(found, None)
    with torch.no_grad():
        ema.weight.zero_()
    counter.n = 7
    restore(saved, None)
    assert counter.n == 0 and ema.weight.abs().sum() > 0


def test_a_checkpoint_loads_with_weights_only(tmp_path):
    model, optimizer, scheduler, scaler = _setup()
    _train(model, optimizer, scheduler, scaler, 3)
    found = Finder().find([optimizer], [scheduler])
    data = checkpoint(found)
    data["step"] = 3
    path = tmp_path / "deep" / "r0.pt"
    write_checkpoint(path, data)
    assert [p.name for p in path.parent.iterdir()] == ["r0.pt"]
    loaded = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    assert torch.equal(loaded["rng"]["torch"], torch.get_rng_state())
    fresh, *_ = _setup()
    fresh.load_state_dict(loaded["modules"][0]["state_dict"])
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    fresh_optimizer.load_state_dict(loaded["optimizers"][0]["state_dict"])
    assert loaded["schedulers"][0]["state_dict"]["last_epoch"] == scheduler.last_epoch
    assert loaded["scalers"][0]["scale"] == scaler.get_scale()


def test_sizes():
    assert parse_bytes("1000") == 1000
    assert parse_bytes("8G") == 8 << 30
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1.5k") == 1536
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")
