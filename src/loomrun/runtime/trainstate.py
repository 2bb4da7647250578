"""A worker's training state, found with no code, copied to host memory and put back in
place: what a snapshot holds, what a rollback restores and what a save writes.

What it holds: every parameter and buffer of the modules the optimizers train, each
optimizer's state and its param groups' values, each LR scheduler's and GradScaler's
state, the objects given to `loomrun.track`, and the RNG states (Python's, numpy's when
it is loaded, torch's CPU one, and CUDA's once CUDA is initialised).

The modules are found by one look over the live objects (`gc`): the outermost modules
that hold a parameter an optimizer steps. The look is made again only when the
optimizers' parameters change. A module no optimizer trains (an EMA copy) is not found:
`loomrun.track(ema)` adds it.

Everything is copied to host memory, never to the training device. Putting it back is in
place, into the script's own tensors, dicts and objects, so every reference to them stays
good (DDP's, an optimizer wrapper's, the script's). The values loomrun steers stay in
effect: a steered key of a param group gets back the script's own value of the snapshot,
and the rule of the change goes on applying to it (lr: that schedule times new/old).
"""

from __future__ import annotations

import copy
import gc
import os
import random
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loomrun.runtime.keep import InEffect


class StateError(Exception):
    """The state cannot be taken or put back; one line for the change's answer."""


@dataclass
class Found:
    """The objects whose state is a worker's training state."""

    tensors: list = field(default_factory=list)  # parameters and buffers, each once
    modules: list = field(default_factory=list)  # the outermost modules, for a save
    loose: list = field(default_factory=list)  # trained parameters of no module found
    optimizers: list = field(default_factory=list)
    schedulers: list = field(default_factory=list)
    scalers: list = field(default_factory=list)
    objects: list = field(default_factory=list)  # `loomrun.track`ed, with a state_dict

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors) + sum(
            _state_bytes(o.state) for o in self.optimizers
        )


def _state_bytes(state) -> int:
    return sum(
        v.numel() * v.element_size()
        for per in state.values()
        for v in per.values()
        if hasattr(v, "element_size")
    )


class Finder:
    """Finds the training state's objects, and keeps what it found until the optimizers'
    parameters change (the look over every live object costs tens of milliseconds)."""

    def __init__(self) -> None:
        self.tracked: list = []  # weakrefs, or the objects that take none
        self._key: tuple = ()
        self._found: tuple[list, list] = ([], [])  # weakrefs to modules, to scalers

    def track(self, *objects: Any) -> None:
        for obj in objects:
            if not any(_deref(t) is obj for t in self.tracked):
                try:
                    self.tracked.append(weakref.ref(obj))
                except TypeError:
                    self.tracked.append(obj)

    def find(self, optimizers: list, schedulers) -> Found:
        import torch

        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        key = (tuple(map(id, params)), len(self.tracked))
        if key != self._key or any(r() is None for r in self._found[0]):
            self._key, self._found = key, self._look(torch, {id(p) for p in params})
        modules = [m for m in (r() for r in self._found[0]) if m is not None]
        tracked = [t for t in map(_deref, self.tracked) if t is not None]
        modules += [t for t in tracked if isinstance(t, torch.nn.Module) and t not in modules]
        found = Found(modules=modules, optimizers=list(optimizers))
        seen: set[int] = set()
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    found.tensors.append(tensor)
        for param in params:
            if id(param) not in seen:
                seen.add(id(param))
                found.tensors.append(param)
                found.loose.append(param)
        ids = {id(o) for o in optimizers}
        found.schedulers = [s for s in list(schedulers) if id(_inner(s)) in ids]
        found.scalers = [s for s in (r() for r in self._found[1]) if s is not None]
        found.objects = [
            t for t in tracked
            if not isinstance(t, torch.nn.Module) and hasattr(t, "state_dict")
            and hasattr(t, "load_state_dict")
        ]  # fmt: skip
        return found

    @staticmethod
    def _look(torch, trained: set[int]) -> tuple[list, list]:
        """The outermost modules holding a trained parameter, and the GradScalers in use."""
        scaler_kind = getattr(getattr(torch, "amp", None), "GradScaler", None)
        modules, scalers = [], []
        module_kind = torch.nn.Module
        for obj in gc.get_objects():
            kind = type(obj)  # not isinstance: a module-level proxy warns when asked its class
            if issubclass(kind, module_kind):
                modules.append(obj)
            elif scaler_kind is not None and issubclass(kind, scaler_kind) and obj.is_enabled():
                scalers.append(weakref.ref(obj))
        inner = {id(child) for m in modules for child in m.children()}
        roots = [
            weakref.ref(m)
            for m in modules
            if id(m) not in inner and any(id(p) in trained for p in m.parameters())
        ]
        return roots, scalers


def _deref(held: Any) -> Any:
    return held() if isinstance(held, weakref.ref) else held


def _inner(scheduler) -> Any:
    """The torch optimizer a scheduler steps (a wrapper's own, when it wraps one)."""
    optimizer = getattr(scheduler, "optimizer", None)
    return getattr(optimizer, "optimizer", optimizer)


def host(value: Any, copied: bool = True) -> Any:
    """A copy in host memory: tensors copied to the CPU, loomrun's values as the plain
    floats they are, everything else deep-copied. Not `copied`: a tensor on the CPU as it
    is (a save writes it at once, while the step waits)."""
    if hasattr(value, "detach") and hasattr(value, "to"):
        return value.detach().to("cpu", copy=copied)
    if type(value) is InEffect:
        return float(value)
    if isinstance(value, dict):
        return {k: host(v, copied) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(host(v, copied) for v in value)
    return copy.deepcopy(value)


@dataclass
class Captured:
    """A snapshot's content: each live object (weakly) with its copy."""

    tensors: list  # (weakref to the live tensor, its copy)
    optimizers: list  # (weakref, its class, each group's values, {param id: (ref, state)})
    schedulers: list  # (weakref, state_dict)
    scalers: list
    objects: list
    rng: dict
    nbytes: int


def capture(found: Found, steered) -> Captured:
    """Copy the state to host memory. `steered` (runtime.steered.Steered) gives the
    script's own value of each steered key: the snapshot holds the script's values."""
    tensors = [(weakref.ref(t), host(t)) for t in found.tensors]
    optimizers = []
    for optimizer in found.optimizers:
        groups = []
        for group in optimizer.param_groups:
            values = {}
            for key, value in group.items():
                if key == "params":
                    continue
                if steered is not None:
                    value = steered.own_at(group, key, value)
                values[key] = host(value)
            groups.append(values)
        state = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                per = optimizer.state.get(param)
                state[id(param)] = (weakref.ref(param), host(dict(per)) if per else None)
        optimizers.append((weakref.ref(optimizer), type(optimizer), groups, state))
    schedulers = [(weakref.ref(s), host(s.state_dict())) for s in found.schedulers]
    scalers = [(weakref.ref(s), host(s.state_dict())) for s in found.scalers]
    objects = [(_ref(o), host(o.state_dict())) for o in found.objects]
    nbytes = sum(c.numel() * c.element_size() for _, c in tensors)
    nbytes += sum(_state_bytes({k: s for k, (_, s) in st.items() if s}) for *_, st in optimizers)
    return Captured(tensors, optimizers, schedulers, scalers, objects, rng_state(), nbytes)


def _ref(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def check(saved: Captured) -> None:
    """Raise StateError when the snapshot cannot be put back whole (a tensor's shape or
    type changed, or none of its tensors exists any more): then nothing is changed."""
    live = [(ref(), copied) for ref, copied in saved.tensors]
    if saved.tensors and all(tensor is None for tensor, _ in live):
        raise StateError("none of its tensors exists any more (the model was made anew)")
    for tensor, copied in live:
        if tensor is not None and (tensor.shape != copied.shape or tensor.dtype != copied.dtype):
            raise StateError(
                f"a tensor of shape {tuple(copied.shape)} ({copied.dtype}) at the snapshot "
                f"is {tuple(tensor.shape)} ({tensor.dtype}) now"
            )


def restore(saved: Captured, steered, optimizers_now=()) -> tuple[list[str], list]:
    """Put the state back in place (`check` it first); then every parameter's gradient
    is None (it was computed on the parameters just replaced: torch's optimizers skip a
    parameter with none). The objects `loomrun.track` was given go first: their own
    `load_state_dict` may raise, and then only they were touched. Returns notes for the
    answer (what was not put back, and why), and the schedulers restored."""
    import torch

    check(saved)
    for ref, state in saved.objects:
        if (obj := ref()) is not None:
            obj.load_state_dict(copy.deepcopy(state))
    live = [(ref(), copied) for ref, copied in saved.tensors]
    notes: list[str] = []
    with torch.no_grad():
        for tensor, copied in live:
            if tensor is not None:
                tensor.copy_(copied)
        for ref, kind, groups, state in saved.optimizers:
            optimizer = ref()
            if optimizer is not None:
                _restore_optimizer(optimizer, kind, groups, state, steered, notes)
    restored = []
    for ref, state in saved.schedulers:
        if (scheduler := ref()) is not None:
            scheduler.load_state_dict(copy.deepcopy(state))
            restored.append(scheduler)
    for ref, state in saved.scalers:
        if (obj := ref()) is not None:
            obj.load_state_dict(copy.deepcopy(state))
    set_rng_state(saved.rng)
    for tensor, _ in live:
        if tensor is not None and tensor.requires_grad:
            tensor.grad = None
    _missing(saved, live, optimizers_now, restored, notes)
    return notes, restored


def _missing(saved: Captured, live, optimizers_now, restored, notes: list[str]) -> None:
    """What the answer must say was not put back: objects gone since, or made since."""
    gone = {
        "tensors": sum(1 for tensor, _ in live if tensor is None),
        "optimizers": sum(1 for ref, *_ in saved.optimizers if ref() is None),
        "schedulers": len(saved.schedulers) - len(restored),
    }
    for what, count in gone.items():
        if count:
            notes.append(f"{count} {what} of the snapshot no longer exist")
    known = {id(ref()) for ref, *_ in saved.optimizers if ref() is not None}
    new = [o for o in optimizers_now if id(o) not in known]
    if new:
        notes.append(f"{len(new)} optimizers made since the snapshot keep their state")


def _restore_optimizer(optimizer, kind, groups, state, steered, notes: list[str]) -> None:
    """An optimizer's state and param groups, in place. Its kind switched since the
    snapshot (`set optimizer=...`, which stays in effect): the state of the other kind
    does not fit it, and it starts fresh, with the snapshot's lr."""
    from loomrun.runtime.switch import CARRIED

    same = type(optimizer) is kind
    if not same:
        notes.append(
            f"the optimizer is a {type(optimizer).__name__} now, a {kind.__name__} at the "
            "snapshot: its state starts fresh"
        )
    if len(groups) != len(optimizer.param_groups):
        notes.append("the optimizer's param groups changed since the snapshot: theirs stay")
        groups = []
    for group, values in zip(optimizer.param_groups, groups, strict=False):
        for key, value in values.items():
            if key not in group or (not same and key not in CARRIED):
                continue
            found = group[key]
            if hasattr(found, "copy_"):  # a tensor lr (capturable): filled in place
                if hasattr(value, "shape"):
                    found.copy_(value)
                else:
                    found.fill_(value)
                continue
            group[key] = copy.deepcopy(value)  # as the script's own write
            if steered is not None:
                steered.written(group, key)  # the steered rule, on the script's value again
    for group in optimizer.param_groups:
        for param in group["params"]:
            ref, saved = state.get(id(param), (None, None))
            per = optimizer.state.get(param)
            if not same or ref is None or ref() is not param or saved is None:
                if per is not None:
                    del optimizer.state[param]
                continue
            fresh = {}
            for key, value in saved.items():
                now = per.get(key) if per is not None else None
                if hasattr(value, "shape"):
                    if _fits(now, value):
                        now.copy_(value)
                        fresh[key] = now
                    else:  # a step count lives on the CPU unless the steps run on the device
                        on_device = value.dim() > 0 or group.get("capturable") or group.get("fused")
                        fresh[key] = value.to(param.device if on_device else "cpu", copy=True)
                else:
                    fresh[key] = copy.deepcopy(value)
            if per is None:
                optimizer.state[param] = fresh
            else:
                per.clear()
                per.update(fresh)


def _fits(live: Any, saved: Any) -> bool:
    return hasattr(live, "shape") and live.shape == saved.shape and live.dtype == saved.dtype


def rng_state() -> dict:
    """The RNG states, as tensors and plain types (a save loads with weights_only)."""
    import torch

    version, words, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64),
                   "gauss": gauss},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = {
            "name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached),
        }  # fmt: skip
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_available() and cuda.is_initialized():  # not run on a GPU yet
        state["cuda"] = [s.clone() for s in cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    import torch

    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    torch.set_rng_state(state["torch"])
    numpy = sys.modules.get("numpy")
    if numpy is not None and "numpy" in state:
        saved = state["numpy"]
        keys = saved["keys"].numpy().astype("uint32")
        numpy.random.set_state(
            (saved["name"], keys, saved["pos"], saved["has_gauss"], saved["cached"])
        )
    if "cuda" in state and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint(found: Found) -> dict:
    """The state as a checkpoint on disk holds it: torch's own state_dicts (the values in
    effect in the param groups, as the steps run with them) on the CPU, and the RNG
    states; every part a tensor or a plain type, so that `torch.load` loads it with
    `weights_only=True`. Written at once, while the step waits: CPU tensors are not
    copied."""

    def plain(value: Any) -> Any:
        return host(value, copied=False)

    return {
        "modules": [
            {"type": type(_unwrapped(m)).__name__, "state_dict": plain(_unwrapped(m).state_dict())}
            for m in found.modules
        ],
        "params": [plain(p) for p in found.loose],
        "optimizers": [
            {"type": type(o).__name__, "state_dict": plain(o.state_dict())}
            for o in found.optimizers
        ],
        "schedulers": [
            {"type": type(s).__name__, "state_dict": plain(s.state_dict())}
            for s in found.schedulers
        ],
        "scalers": [plain(s.state_dict()) for s in found.scalers],
        "objects": [plain(o.state_dict()) for o in found.objects],
        "rng": rng_state(),
    }


def _unwrapped(module) -> Any:
    """The script's model under DDP, DataParallel or torch.compile's wrapper (its keys
    without their `module.` or `_orig_mod.` prefix)."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if inner is None and type(module).__name__ in ("DistributedDataParallel", "DataParallel"):
            inner = getattr(module, "module", None)
        if inner is None:
            return module
        module = inner


def write_checkpoint(path: Path, data: dict) -> None:
    """`torch.save` to a file beside it, flushed to disk, then renamed over `path`: a
    reader finds the whole file or none."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as out:
            torch.save(data, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
