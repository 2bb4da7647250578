"""A replica's training state, written out for another replica of the job and put in
place there (`loomrun copy r2 --from r0`), with no restart: what the share and copy
actions of runtime.snapshots do with a segment (statesegment).

What moves is what a snapshot holds, matched by position, since the same script finds its
objects in the same order: the parameters and buffers, each optimizer's state and param
groups (the script's own values: a replica's steered values stay its own, as after a
rollback), the schedulers', GradScalers' and tracked objects' states. Not the RNG states:
replicas that drew the same random numbers from then on (dropout, sampling) would explore
less, so each keeps its own.

The segment holds a StateManifest (protobuf): each tensor's type, shape and offset, and
the rest as a tree of plain values (none, bools, ints, floats, text, lists, tuples, maps,
tensor indices); the tensors' bytes follow, copied there straight from the device. Nothing
is unpickled; every offset and index is checked against the segment before it is used.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from loomrun import statesegment as seg
from loomrun._proto import loomrun_pb2 as pb
from loomrun.runtime.keep import InEffect
from loomrun.runtime.trainstate import Captured, Found, StateError, rng_state

DEEPEST = 32  # levels of nesting a value may have
# The tensor types a copy carries (any bytes are a valid value of each; a bool's are
# checked to be 0 or 1).
DTYPES = frozenset({
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "bool",
})  # fmt: skip


@dataclass
class Shared:
    """What a share wrote: the segment, its size, the seconds it took."""

    path: Path
    nbytes: int
    seconds: float


def share(found: Found, steered, source: str, step: int, path: Path, budget: int) -> Shared:
    """Write the state into a new segment at `path`: StateError when it does not fit in
    `budget` bytes, or holds a value a copy cannot carry."""
    started = time.perf_counter()
    tensors: list = []
    tree = to_tree(_payload(found, steered), tensors)
    manifest = pb.StateManifest(source=source, step=step, tree=tree)
    position = 0
    for tensor in tensors:
        if str(tensor.dtype).removeprefix("torch.") not in DTYPES or not _strided(tensor):
            raise StateError(
                f"the state holds a tensor of {tensor.dtype}, which a copy cannot carry"
            )
        manifest.tensors.add(
            dtype=str(tensor.dtype).removeprefix("torch."), shape=tensor.shape, offset=position
        )
        position = seg.aligned(position + tensor.numel() * tensor.element_size())
    head = manifest.SerializeToString()
    data = seg.aligned(seg.HEADER + len(head))
    size = data + position
    if size > budget:
        from loomrun.outcomes import size_words

        raise StateError(f"the state takes {size_words(size)}, more than {size_words(budget)}")
    view = seg.create(path, size)
    try:  # its size last: until then no reader takes it, and the sweep knows its supervisor
        view[: seg.HEADER] = seg.header(0, len(head), data, _supervisor())
        view[seg.HEADER : seg.HEADER + len(head)] = head
        _write(view, tensors, manifest, data)
        view[8:16] = size.to_bytes(8, "little")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        with contextlib.suppress(BufferError):  # the error above is the one said
            view.close()
    return Shared(path, size, time.perf_counter() - started)


def _strided(tensor) -> bool:
    import torch

    return tensor.layout == torch.strided


def _write(view, tensors: list, manifest: pb.StateManifest, data: int) -> None:
    import torch

    for tensor, entry in zip(tensors, manifest.tensors, strict=True):
        if tensor.numel():
            into = torch.frombuffer(
                view, dtype=tensor.dtype, count=tensor.numel(), offset=data + entry.offset
            )
            try:
                into.view(tensor.shape).copy_(tensor.detach())
            finally:
                del into  # the map closes only once no tensor points into it


def _supervisor() -> int:
    return os.getppid()  # the worker's supervisor, which spawned it


def _payload(found: Found, steered) -> dict:
    optimizers = []
    for optimizer in found.optimizers:
        groups, states = [], []
        for group in optimizer.param_groups:
            values = {}
            for key, value in group.items():
                if key != "params":
                    values[key] = steered.own_at(group, key, value) if steered else value
            groups.append(values)
            states.extend(dict(optimizer.state.get(p) or {}) or None for p in group["params"])
        optimizers.append({"kind": type(optimizer).__name__, "groups": groups, "state": states})
    return {
        "tensors": list(found.tensors),
        "optimizers": optimizers,
        "schedulers": [
            {"kind": type(s).__name__, "state": s.state_dict()} for s in found.schedulers
        ],
        "scalers": [s.state_dict() for s in found.scalers],
        "objects": [o.state_dict() for o in found.objects],
    }


def to_tree(value: Any, tensors: list, depth: int = 0) -> pb.StateTree:
    """A value as a tree of plain values, its tensors appended to `tensors` (by reference:
    their bytes are copied once, into the segment)."""
    if depth > DEEPEST:
        raise StateError(f"the state nests deeper than {DEEPEST} levels")
    tree = pb.StateTree()
    if value is None:
        tree.none = True
    elif isinstance(value, bool):
        tree.b = value
    elif isinstance(value, int) and -(2**63) <= value < 2**63:
        tree.i = value
    elif type(value) is InEffect or isinstance(value, float):
        tree.f = float(value)
    elif isinstance(value, str):
        tree.s = value
    elif hasattr(value, "detach") and hasattr(value, "element_size"):
        tensors.append(value)
        tree.tensor = len(tensors) - 1
    elif isinstance(value, dict):
        for key, item in value.items():
            tree.map.items.append(to_tree(key, tensors, depth + 1))
            tree.map.items.append(to_tree(item, tensors, depth + 1))
    elif isinstance(value, list | tuple):
        into = tree.tuple if isinstance(value, tuple) else tree.list
        into.items.extend(to_tree(item, tensors, depth + 1) for item in value)
    elif type(value).__module__ == "numpy" and hasattr(value, "item"):
        return to_tree(value.item(), tensors, depth)
    else:
        raise StateError(f"the state holds a {type(value).__name__}, which a copy cannot carry")
    return tree


def from_tree(tree: pb.StateTree, tensors: list, depth: int = 0) -> Any:
    """The value back; its tensors are `tensors[i]` (each index checked)."""
    if depth > DEEPEST:
        raise StateError(f"the copy nests deeper than {DEEPEST} levels")
    kind = tree.WhichOneof("kind")
    if kind in (None, "none"):
        return None
    if kind in ("b", "i", "f", "s"):
        return getattr(tree, kind)
    if kind == "tensor":
        if tree.tensor >= len(tensors):
            raise StateError(f"the copy names tensor {tree.tensor} of {len(tensors)}")
        return tensors[tree.tensor]
    items = [from_tree(t, tensors, depth + 1) for t in getattr(tree, kind).items]
    if kind == "tuple":
        return tuple(items)
    if kind == "list":
        return items
    if len(items) % 2:
        raise StateError("the copy holds a map with a key and no value")
    keys = items[0::2]
    if not all(isinstance(k, str | int | float | bool | type(None) | tuple) for k in keys):
        raise StateError("the copy holds a map keyed by something that cannot be a key")
    return dict(zip(keys, items[1::2], strict=True))


class Incoming:
    """A copy's segment, read: its manifest and its tensors (views of its bytes, valid
    until `close`)."""

    def __init__(self, path: Path):
        self.path = path
        self.view, length, data = seg.open_segment(path)
        try:
            self.manifest = pb.StateManifest.FromString(self.view[seg.HEADER : seg.HEADER + length])
        except (DecodeError, RecursionError):
            self.close()
            raise StateError(f"{path.name} holds a malformed manifest") from None
        try:
            self.tensors = [self._tensor(e, data) for e in self.manifest.tensors]
            self.tree = from_tree(self.manifest.tree, self.tensors)
        except BaseException:
            self.close()
            raise

    def _tensor(self, entry: pb.StateTensor, data: int):
        import torch

        dtype = getattr(torch, entry.dtype) if entry.dtype in DTYPES else None
        if not isinstance(dtype, torch.dtype) or entry.offset % seg.ALIGN:
            raise StateError(f"the copy holds a tensor of type {entry.dtype!r} at {entry.offset}")
        if any(n < 0 for n in entry.shape) or len(entry.shape) > 64:
            raise StateError(f"the copy holds a tensor of shape {list(entry.shape)}")
        count = 1
        for n in entry.shape:
            count *= n
        start = data + entry.offset
        if start + count * dtype.itemsize > len(self.view):
            raise StateError("the copy holds a tensor past its end")
        if not count:
            return torch.empty(tuple(entry.shape), dtype=dtype)
        if dtype == torch.bool:
            found = torch.frombuffer(self.view, dtype=torch.uint8, count=count, offset=start)
            if int(found.max()) > 1:
                raise StateError("the copy holds a bool tensor with bytes other than 0 and 1")
            return found.view(torch.bool).view(tuple(entry.shape))
        found = torch.frombuffer(self.view, dtype=dtype, count=count, offset=start)
        return found.view(tuple(entry.shape))

    def close(self) -> None:
        self.tensors, self.tree = [], None
        with contextlib.suppress(BufferError):  # a tensor points into it: it goes with the last
            self.view.close()


def bind(incoming: Incoming, found: Found) -> Captured:
    """The copy as a snapshot of this replica: each of its values paired with this
    replica's object at the same position, so that trainstate.restore puts it in place.
    StateError when the two do not train the same model the same way (nothing changed)."""
    tree, source = incoming.tree, incoming.manifest.source
    if not isinstance(tree, dict):
        raise StateError(f"the copy of {source} holds no state")
    theirs = _listed(tree, "tensors")
    if len(theirs) != len(found.tensors):
        raise StateError(
            f"{source} trains {len(theirs)} tensors, this replica {len(found.tensors)}: not "
            "the same model"
        )
    for i, (mine, copied) in enumerate(zip(found.tensors, theirs, strict=True)):
        if not hasattr(copied, "shape") or mine.shape != copied.shape or mine.dtype != copied.dtype:
            shape = tuple(getattr(copied, "shape", ()))
            raise StateError(
                f"tensor {i} is {shape} ({getattr(copied, 'dtype', '?')}) on {source}, "
                f"{tuple(mine.shape)} ({mine.dtype}) here: not the same model"
            )
    optimizers = _optimizers(_listed(tree, "optimizers"), found.optimizers, source)
    schedulers = _listed(tree, "schedulers")
    kinds = [type(s).__name__ for s in found.schedulers]
    if [s.get("kind") if isinstance(s, dict) else None for s in schedulers] != kinds:
        raise StateError(f"{source}'s schedulers are not this replica's ({', '.join(kinds)})")
    pairs = {}
    for what, live in (("scalers", found.scalers), ("objects", found.objects)):
        held = _listed(tree, what)
        if len(held) != len(live):
            raise StateError(
                f"{source} has {len(held)} {what} to put back, this replica {len(live)}"
            )
        pairs[what] = [(weakref.ref(o), s) for o, s in zip(live, held, strict=True)]
    return Captured(
        tensors=[(weakref.ref(t), c) for t, c in zip(found.tensors, theirs, strict=True)],
        optimizers=optimizers,
        schedulers=[
            (weakref.ref(s), held["state"])
            for s, held in zip(found.schedulers, schedulers, strict=True)
        ],
        scalers=pairs["scalers"],
        objects=pairs["objects"],
        rng=rng_state(),  # this replica's own, kept
        nbytes=len(incoming.view),
    )


def _listed(tree: dict, key: str) -> list:
    found = tree.get(key)
    if not isinstance(found, list):
        raise StateError(f"the copy has no list of {key}")
    return found


def _optimizers(held: list, live: list, source: str) -> list:
    if len(held) != len(live):
        raise StateError(f"{source} has {len(held)} optimizers, this replica {len(live)}")
    bound = []
    for optimizer, saved in zip(live, held, strict=True):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        states = saved.get("state") if isinstance(saved, dict) else None
        groups = saved.get("groups") if isinstance(saved, dict) else None
        if not isinstance(states, list) or not isinstance(groups, list):
            raise StateError(f"the copy of {source} holds a malformed optimizer")
        if len(states) != len(params):
            raise StateError(
                f"{source}'s optimizer steps {len(states)} parameters, this replica's {len(params)}"
            )
        name = saved.get("kind")
        kind = type(optimizer) if name == type(optimizer).__name__ else type(str(name), (), {})
        state = {id(p): (weakref.ref(p), s) for p, s in zip(params, states, strict=True)}
        bound.append((weakref.ref(optimizer), kind, groups, state))
    return bound


def scheduler_rate(schedulers, step: int) -> dict[int, int]:
    """How many steps each scheduler takes in one optimizer step, from its own count so
    far (one, stepped with the optimizer; none, stepped once an epoch)."""
    rates = {}
    for scheduler in schedulers:
        count = getattr(scheduler, "last_epoch", None)
        if isinstance(count, int) and step > 0:
            rates[id(scheduler)] = round(count / step)
    return rates


# -- the actions (runtime.snapshots dispatches them) -----------------------------------------


def store_budget() -> tuple[int, str]:
    """The bytes one state may take in the broker's object store, and where that figure
    comes from (LOOMRUN_COPY_STORE_BYTES; 1G unless told)."""
    from loomrun.runtime.snapshots import parse_bytes

    text = os.environ.get("LOOMRUN_COPY_STORE_BYTES", "")
    try:
        return parse_bytes(text or "1G"), "the object store's budget, LOOMRUN_COPY_STORE_BYTES"
    except ValueError:
        return 1 << 30, "the object store's budget of 1G (LOOMRUN_COPY_STORE_BYTES is not a size)"


def _independent(snapshots, what: str) -> None:
    from loomrun.runtime.snapshots import ActionError

    group = snapshots.worker.group
    if group is not None:
        raise ActionError(
            f"a rank of a process group of {group.size} cannot {what}: copy is for independent "
            "replicas (the ranks of a group train one model together)"
        )


def share_action(snapshots, value: dict, step: int) -> dict:
    """This replica's state, written out for one `loomrun copy`: the share's answer."""
    from loomrun.runtime.snapshots import ActionError, text

    _independent(snapshots, "share its state")
    target, token, via = text(value, "target"), text(value, "token"), text(value, "via")
    budget, where = seg.free_bytes(), "the room left in /dev/shm"
    if via == "store":
        limit, where = store_budget()
        budget = min(budget, limit)
    elif via != "shm":
        raise ActionError(f"via must be shm or store, not {via!r}")
    me = os.environ.get("LOOMRUN_REPLICA", "r0")
    try:
        path = seg.segment_path(os.environ.get("LOOMRUN_JOB", ""), me, target, token)
        shared = share(snapshots.found(), snapshots.steered(), me, step, path, budget)
    except (StateError, seg.SegmentError) as error:
        said = f"{error} ({where})" if "more than" in str(error) else str(error)
        raise ActionError(f"cannot share the state: {said}") from None
    return {"target": target, "token": token, "via": via, "bytes": shared.nbytes,
            "seconds": round(shared.seconds, 6)}  # fmt: skip


def copy_action(snapshots, value: dict, step: int) -> dict:
    """Another replica's state, shared for this one, put in place at this step (its
    segment goes, whatever becomes of the copy): the copy's answer."""
    from loomrun.runtime.snapshots import ActionError, text
    from loomrun.runtime.trainstate import restore

    _independent(snapshots, "copy another replica's state")
    source, token = text(value, "from"), text(value, "token")
    me = os.environ.get("LOOMRUN_REPLICA", "r0")
    started = time.perf_counter()
    path = None
    try:
        if text(value, "problem"):  # its supervisor could not fetch it (control.transfer)
            raise StateError(text(value, "problem"))
        path = seg.segment_path(os.environ.get("LOOMRUN_JOB", ""), source, me, token)
        incoming = Incoming(path)
    except (StateError, seg.SegmentError) as error:
        raise ActionError(f"cannot copy {source}'s state: {error}") from None
    finally:
        if path is not None:
            path.unlink(missing_ok=True)  # mapped, it stays readable here until closed
    try:
        if (incoming.manifest.source, incoming.manifest.step) != (source, value.get("step")):
            raise StateError(
                f"the segment holds {incoming.manifest.source}'s state of step "
                f"{incoming.manifest.step}, not {source}'s of step {value.get('step')}"
            )
        found = snapshots.found()
        captured = bind(incoming, found)
    except StateError as error:
        incoming.close()
        raise ActionError(f"cannot copy {source}'s state: {error}") from None
    except BaseException:
        incoming.close()
        raise
    optimizers = snapshots.optimizers.optimizers if snapshots.optimizers is not None else []
    taken, nbytes = incoming.manifest.step, len(incoming.view)
    try:
        rates = scheduler_rate(found.schedulers, step)
        notes, restored = restore(captured, snapshots.steered(), optimizers)
    except Exception as error:  # noqa: BLE001 - said in the answer
        raise ActionError(
            f"the copy from {source} failed part-way ({type(error).__name__}: {error}): this "
            f"replica's state is now partly {source}'s"
        ) from None
    finally:
        del captured
        incoming.close()
    snapshots.skip(restored, rates)
    done = {"from": source, "step": taken, "bytes": nbytes,
            "seconds": round(time.perf_counter() - started, 6)}  # fmt: skip
    if notes:
        done["note"] = "; ".join(notes)
    return done
