"""A training state written into a copy's segment and put in place in another model of the
same shape (runtime.statecopy, statesegment), in one process with real torch: bitwise the
source's, optimizer and scheduler included, the target's RNG kept; and every way a segment
or a request can be wrong is one line, with nothing changed."""

from __future__ import annotations

import os
import secrets
import struct

import pytest
import torch
from torch import nn

from loomrun import statesegment as seg
from loomrun._proto import loomrun_pb2 as pb
from loomrun.runtime import statecopy as sc
from loomrun.runtime.trainstate import Finder, StateError, restore


def trained(seed: int, width: int = 16):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, width), nn.BatchNorm1d(width), nn.Linear(width, 1))
    model.register_buffer("mask", torch.rand(width) > 0.5)  # a bool travels as 0/1 bytes
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5**e)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler, Finder().find([optimizer], [scheduler])


@pytest.fixture
def path():
    made = seg.segment_path(f"unit{os.getpid()}", "r0", "r1", secrets.token_hex(8))
    yield made
    made.unlink(missing_ok=True)


def test_a_copy_is_bitwise_the_sources_and_keeps_the_targets_rng(path):
    model, optimizer, scheduler, found = trained(0)
    other, other_optimizer, other_scheduler, other_found = trained(1)
    shared = sc.share(found, None, "r0", 7, path, seg.free_bytes())
    assert shared.nbytes == path.stat().st_size and oct(path.stat().st_mode)[-3:] == "600"
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    incoming = sc.Incoming(path)
    assert (incoming.manifest.source, incoming.manifest.step) == ("r0", 7)
    notes, restored = restore(sc.bind(incoming, other_found), None, [other_optimizer])
    incoming.close()
    assert notes == [] and restored == [other_scheduler]
    for mine, theirs in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)
    want, got = optimizer.state_dict(), other_optimizer.state_dict()
    for key, state in want["state"].items():
        for name, value in state.items():
            assert torch.equal(value, got["state"][key][name]), name
    assert got["param_groups"][0]["betas"] == (0.8, 0.9)
    assert other_scheduler.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]
    assert torch.equal(torch.get_rng_state(), rng), "the target's own random numbers"


def test_another_model_is_refused_and_left_as_it_was(path):
    _, _, _, found = trained(0)
    other, _, _, other_found = trained(1, width=32)
    before = [t.clone() for t in other.state_dict().values()]
    sc.share(found, None, "r0", 7, path, seg.free_bytes())
    incoming = sc.Incoming(path)
    with pytest.raises(StateError, match=r"tensor 0 is \(16, 8\) .* on r0, \(32, 8\) .* here"):
        sc.bind(incoming, other_found)
    incoming.close()
    assert all(torch.equal(a, b) for a, b in zip(before, other.state_dict().values(), strict=True))


def test_a_state_over_its_budget_is_refused_before_anything_is_written(path):
    _, _, _, found = trained(0)
    with pytest.raises(StateError, match=r"the state takes 4\.\d KB, more than 1\.0 KB"):
        sc.share(found, None, "r0", 7, path, 1000)
    assert not path.exists()


def test_a_value_a_copy_cannot_carry_is_named():
    with pytest.raises(StateError, match="holds a object, which a copy cannot carry"):
        sc.to_tree({"fine": [1, 2.5, "x", None, (True,)], "bad": object()}, [])
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(StateError, match="nests deeper than 32"):
        sc.to_tree(deep, [])


def test_a_tree_comes_back_as_it_went():
    tensors: list = []
    value = {0: {"step": torch.tensor(3.0)}, "groups": [{"betas": (0.9, 0.99), "lr": 1e-3}],
             "none": None, "flag": False, "big": 2**62}  # fmt: skip
    tree = sc.to_tree(value, tensors)
    again = sc.from_tree(pb.StateTree.FromString(tree.SerializeToString()), tensors)
    assert again == value
    with pytest.raises(StateError, match="names tensor 5 of 1"):
        sc.from_tree(pb.StateTree(tensor=5), tensors)


@pytest.mark.parametrize(
    "spoil, said",
    [
        (lambda b: b[:8].__class__(b"NOTASTAT") + b[8:], "is not a whole copy"),
        (lambda b: b[: len(b) - 64], "is not a whole copy"),
        (lambda b: b[:20] + struct.pack("<I", 1 << 30) + b[24:], "malformed header"),
        (lambda b: b[:64] + b"\xff" * 32 + b[96:], "malformed manifest"),
    ],
)
def test_a_spoilt_segment_is_one_line(path, spoil, said):
    _, _, _, found = trained(0)
    sc.share(found, None, "r0", 7, path, seg.free_bytes())
    data = spoil(path.read_bytes())
    path.unlink()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, data)
    os.close(fd)
    with pytest.raises((StateError, seg.SegmentError), match=said):
        sc.Incoming(path)


def rewrite(path, manifest: pb.StateManifest) -> None:
    """The segment again, with this manifest before the same tensors' bytes."""
    data = path.read_bytes()
    tensors = data[struct.unpack_from("<Q", data, 24)[0] :]
    head = manifest.SerializeToString()
    start = seg.aligned(seg.HEADER + len(head))
    size = start + len(tensors)
    whole = seg.header(size, len(head), start, os.getpid()) + head
    path.write_bytes(whole + bytes(start - len(whole)) + tensors)


def test_a_tensor_past_the_end_or_of_no_type_is_refused(path):
    _, _, _, found = trained(0)
    sc.share(found, None, "r0", 7, path, seg.free_bytes())
    incoming = sc.Incoming(path)
    manifest = incoming.manifest
    incoming.close()
    rewrite(path, manifest)
    sc.Incoming(path).close()  # rewritten as it was, it reads
    for entry, said in [
        (pb.StateTensor(dtype="float32", shape=[1 << 40], offset=0), "past its end"),
        (pb.StateTensor(dtype="Tensor", shape=[1], offset=0), "of type 'Tensor'"),
        (pb.StateTensor(dtype="float32", shape=[1], offset=3), "at 3"),
    ]:
        spoilt = pb.StateManifest()
        spoilt.CopyFrom(manifest)
        spoilt.tensors[0].CopyFrom(entry)
        rewrite(path, spoilt)
        with pytest.raises(StateError, match=said):
            sc.Incoming(path)


def test_a_copy_is_named_only_as_loomrun_names_it():
    for job, source, target, token in [
        ("j", "r0", "../x", "0" * 16), ("j/..", "r0", "r1", "0" * 16), ("j", "r0", "r1", "xyz"),
    ]:  # fmt: skip
        with pytest.raises(seg.SegmentError, match="not a copy's name"):
            seg.segment_path(job, source, target, token)
    with pytest.raises(seg.SegmentError, match="no .* here"):
        seg.open_segment(seg.segment_path("j", "r0", "r1", "0" * 16))
