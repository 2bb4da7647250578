"""Switching a live torch optimizer to another torch.optim class, in place.

The object the script holds becomes the new kind, so every reference to it stays good:
the script's own, its LR schedulers', its GradScaler's, and the wrappers of Lightning and
accelerate (which read its `state`, `defaults` and `param_groups`: those are changed in
place, never replaced). Swapping `__class__` alone would go wrong silently:

- torch's LR schedulers wrap the instance's `step` around the old class's function, and
  accelerate wraps it again; and the switch itself happens at the step boundary, inside
  the old class's step (its global pre-hooks), which calls the old class's function
  next. So each kind's `step` is, from the moment torch is imported, a dispatch on the
  instance's class (`install`): called through the old class, it runs the new one's.
  This costs each optimizer step one Python call (benchmarks/poll.py);
  LOOMRUN_OPTIMIZER_SWITCH=0 leaves torch's classes alone, and the built-in out.
- the wrapper that fires the global step hooks (loomrun's step boundary among them) is
  put on a class by its first construction: the new class gets it here, whether or not
  the script ever made one.

What the new kind starts with (`switch`): its param groups keep their parameters, their
lr (with the ratios between groups, and whatever loomrun keeps in effect there) and the
keys of CARRIED; every other hyperparameter takes the new kind's default (a value given in
the same `set` is applied right after, as any change). The state starts fresh, except
between kinds whose state is the same quantity (SAME_STATE): SGD's momentum buffer is
about g/(1-momentum), not Adam's first moment, and Adam's bias correction at its first
step would inflate it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loomrun.builtin_params import OPTIMIZERS

# Kept through a switch: the script's lr, its weight decay, and how the steps run.
CARRIED = ("lr", "initial_lr", "weight_decay", "maximize", "foreach", "differentiable",
           "capturable", "fused")  # fmt: skip
# Kinds whose state is the same quantities, kept through a switch between them (with the
# hyperparameters that shape it, when amsgrad stays as it was).
SAME_STATE = ({"adam", "adamw"},)
SAME_STATE_CARRIED = ("betas", "eps", "amsgrad")
# Attributes a torch optimizer class's __init__ sets on the instance, besides its groups.
CLASS_FLAGS = ("_step_supports_amp_scaling", "_need_device_dtype_check_for_fused")
_RAW: dict[type, Callable] = {}  # each kind's own step function, under the dispatch


def install() -> None:
    """Each kind's `step` dispatches on the instance's class (see above); a class torch
    hooked already (constructed before) is dispatched under its hook."""
    import torch

    for name in OPTIMIZERS.values():
        cls = getattr(torch.optim, name, None)
        step = cls.__dict__.get("step") if cls is not None else None
        if step is None or cls in _RAW:
            continue
        hooked = getattr(step, "hooked", False)
        raw = step.__wrapped__ if hooked else step
        _RAW[cls] = raw
        dispatch = _dispatching(cls, raw)
        if hooked:
            dispatch = torch.optim.Optimizer.profile_hook_step(dispatch)
            dispatch.hooked = True
        cls.step = dispatch


def installed() -> bool:
    """Whether the kinds dispatch (LOOMRUN_OPTIMIZER_SWITCH=0 leaves them as torch made
    them, and the `optimizer` built-in out)."""
    return bool(_RAW)


def _dispatching(cls: type, raw: Callable) -> Callable:
    @functools.wraps(raw)
    def step(self, *args, **kwargs):
        kind = type(self)
        if kind is cls:
            return raw(self, *args, **kwargs)
        found = _FOUND.get(kind) or _find(kind, raw)  # switched, or a subclass
        return found(self, *args, **kwargs)

    return step


_FOUND: dict[type, Callable] = {}


def _find(kind: type, raw: Callable) -> Callable:
    """The step a class runs: the first of its classes' own (AdamW steps as Adam does; a
    subclass of SGD calling super().step() as SGD)."""
    found = next((_RAW[c] for c in kind.__mro__ if c in _RAW), raw)
    _FOUND[kind] = found
    return found


@dataclass
class Switched:
    """What a switch did, for its answer."""

    old: str
    new: str
    kept_state: bool = False
    reset: list[str] = field(default_factory=list)  # state entries dropped, by name
    gone: list[str] = field(default_factory=list)  # hyperparameters the new kind lacks
    added: dict[str, Any] = field(default_factory=dict)  # new ones, at their default
    changed: dict[str, Any] = field(default_factory=dict)  # kept ones, now the new kind's

    def sentence(self, steered=()) -> str:
        """What the switch did; `steered`: keys loomrun keeps at a value of a change (the
        new kind's default is not what is in effect there), left out."""
        if self.old == self.new:
            return f"already {self.new}"
        said = []
        if self.kept_state:
            said.append(f"state kept ({self.old} and {self.new} keep the same moments)")
        elif self.reset:
            said.append(f"state reset ({', '.join(self.reset)})")
        else:
            said.append("no state yet")
        for word, found in (("new", self.added), ("now", self.changed)):
            shown = [f"{k}={_plain(v)}" for k, v in found.items() if k not in steered]
            if shown:
                said.append(f"{word}: " + ", ".join(shown))
        if self.gone:
            said.append("gone: " + ", ".join(self.gone))
        return "; ".join(said)


def kind_of(optimizer) -> str | None:
    """The name loomrun knows an optimizer's class by, when it is exactly one of torch's
    (a subclass of one may step its own way: it is not switched)."""
    import torch

    cls = type(optimizer)
    for kind, name in OPTIMIZERS.items():
        if getattr(torch.optim, name, None) is cls:
            return kind
    return None


def refusal(optimizer, kind: str, schedulers=()) -> str:
    """Why `optimizer` cannot become a `kind` in place ("" when it can): what was made
    for its kind would break, or silently do the wrong thing."""
    import inspect

    import torch

    new_cls = getattr(torch.optim, OPTIMIZERS[kind])
    takes = inspect.signature(new_cls.__init__).parameters
    if any(g.get("fused") for g in optimizer.param_groups) and "fused" not in takes:
        return (
            f"this optimizer is fused (a GradScaler steps it on the fused path): {kind} has "
            "no fused step; switch to one that has (sgd, adam, adamw, adagrad)"
        )
    for scheduler in schedulers:
        if not getattr(scheduler, "cycle_momentum", False):
            continue
        cycled = "betas" if getattr(scheduler, "use_beta1", False) else "momentum"
        if cycled not in takes:
            return (
                f"its {type(scheduler).__name__} cycles {cycled}, which {kind} does not "
                "have (the scheduler would fail at its next step)"
            )
    return ""


def check(optimizer, kind: str, schedulers=()) -> tuple[Any, list[str]]:
    """What `switch` would make, made aside (raises ValueError, changing nothing, when it
    cannot be): a fresh optimizer of the new kind over the same parameters, with the new
    kind's defaults and flags, checked by its own __init__ (which also puts the global step
    hooks' wrapper on its class); and the keys carried to it."""
    import torch

    if why := refusal(optimizer, kind, schedulers):
        raise ValueError(why)
    new_cls = getattr(torch.optim, OPTIMIZERS[kind])
    # Between kinds of the same state, their common hyperparameters are the same too
    # (but decoupled_weight_decay, which is what tells AdamW from Adam).
    same_state = {kind_of(optimizer), kind} in SAME_STATE
    carried = [*CARRIED, *(SAME_STATE_CARRIED if same_state else ())]
    groups = [{"params": g["params"], **_carried(g, new_cls, carried)}
              for g in optimizer.param_groups]  # fmt: skip
    try:
        fresh = new_cls(groups, lr=float(optimizer.defaults.get("lr", 1e-3)))
    except (ValueError, RuntimeError, TypeError) as error:
        raise ValueError(f"{kind} refuses this optimizer's settings: {error}") from None
    return fresh, carried


def switch(optimizer, kind: str, values: list[dict] | None = None, schedulers=()) -> Switched:
    """Make `optimizer` a `kind` (a key of OPTIMIZERS) in place, at a step boundary;
    `values`: per param group, hyperparameters to take rather than the new kind's
    defaults (the script's own, going back to its own kind); `schedulers`: the LR
    schedulers of this optimizer. Raises ValueError, changing nothing, when it cannot."""
    old_kind = kind_of(optimizer)
    if old_kind is None:
        raise ValueError(f"{type(optimizer).__name__} is not one of torch.optim's optimizers")
    done = Switched(old_kind, kind)
    if old_kind == kind:
        return done
    fresh, carried = check(optimizer, kind, schedulers)
    new_cls = type(fresh)
    same_state = {old_kind, kind} in SAME_STATE
    old_keys = set(optimizer.defaults)
    amsgrad = [g.get("amsgrad") for g in optimizer.param_groups]
    pairs = zip(optimizer.param_groups, fresh.param_groups, strict=True)
    for index, (group, made) in enumerate(pairs):
        own = values[index] if values and index < len(values) else {}
        for key in [k for k in group if k in old_keys and k not in made]:
            del group[key]
        for key, value in made.items():
            if key == "params" or (key in carried and key in group):
                continue
            value = own.get(key, value)
            if index == 0 and key in group and _plain(group[key]) != value:
                done.changed[key] = value
            group[key] = value
    done.gone = sorted(old_keys - set(fresh.defaults))
    done.added = {k: v for k, v in fresh.defaults.items() if k not in old_keys}
    for key in done.added:
        done.changed.pop(key, None)
        if values:
            done.added[key] = optimizer.param_groups[0].get(key, done.added[key])
    defaults = optimizer.defaults  # in place: a wrapper may hold the same dict
    for key in [k for k in defaults if k not in fresh.defaults]:
        del defaults[key]
    for key, value in fresh.defaults.items():
        if key not in carried or key not in defaults:
            defaults[key] = value
    done.kept_state = same_state and amsgrad == [g.get("amsgrad") for g in optimizer.param_groups]
    if not done.kept_state:
        done.reset = sorted({k for entry in optimizer.state.values() for k in entry})
        optimizer.state.clear()  # in place, as above
    for flag in CLASS_FLAGS:
        if flag in fresh.__dict__:
            setattr(optimizer, flag, fresh.__dict__[flag])
        elif flag in optimizer.__dict__:
            delattr(optimizer, flag)
    optimizer.__class__ = new_cls
    optimizer._patch_step_function()
    return done


def hyperparameters(optimizer) -> list[dict]:
    """Each param group's hyperparameters as they stand (not its parameters), to go back
    to them."""
    keys = set(optimizer.defaults) - {"params"}
    return [{k: _plain(v) for k, v in g.items() if k in keys} for g in optimizer.param_groups]


def _carried(group: dict, new_cls, carried) -> dict:
    """The keys of a param group the new kind takes as they are (as plain values)."""
    import inspect

    takes = inspect.signature(new_cls.__init__).parameters
    return {k: _plain(group[k]) for k in carried if k in group and k in takes and k != "params"}


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, float) else value
