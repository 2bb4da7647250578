"""Zero-code steering of torch optimizers: the step boundary and the built-in parameters.

Nothing here imports torch. The hooks go in when the user's script imports torch (a
post-import hook), so a worker that never uses torch never pays for it.

A global optimizer step pre-hook is the step boundary: the first optimizer seen counts
the steps; changes to lr, momentum, weight_decay and betas are applied there. A steered
value is kept in effect by runtime.keep: put into the param group right before each step
and the script's own value given back right after, so that whatever writes the group
between steps (the script, a scheduler on the optimizer or on any wrapper sharing its
param groups, the Trainer) goes on computing its own schedule. `lr` follows that
schedule times new/old (`--hold`: exactly the value); momentum, weight_decay and betas
are held exactly. `lr` is the first param group's; the other groups keep their ratio to
it. With several groups `lr.0`, `lr.1`, ... steer one group alone.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
import weakref
from typing import TYPE_CHECKING, Any

from loomrun import builtin_params as BP
from loomrun import params as P
from loomrun.runtime.keep import Hold, HoldRatio, InEffect, Kept, Scale, _own_of, _plain
from loomrun.runtime.kind import OptimizerKind
from loomrun.runtime.metrics import track_loss
from loomrun.runtime.steered import Steered
from loomrun.runtime.target import Target

if TYPE_CHECKING:
    from loomrun.runtime.worker import Worker


def is_lr(key: str) -> bool:
    return key == "lr" or key.startswith("lr.")


class Optimizers:
    """The optimizers and schedulers of this worker, the built-in targets they carry, and
    the values loomrun keeps in effect in their param groups (runtime.keep).

    Called by torch's global step hooks and by the scheduler classes' `step` (wrapped when
    the first scheduler of a class is made); the worker calls the targets it publishes."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self._optimizers: list[weakref.ref] = []  # in the order first seen: lr.N counts on it
        self.schedulers: weakref.WeakSet = weakref.WeakSet()
        # The counting optimizer, held weakly: when a script replaces its optimizer, the next
        # one to step takes over. The id is what the hot path compares; the weakref's callback
        # clears it before the id can be reused.
        self._primary_id: int | None = None
        self._primary_ref = None
        # The groups() of the param groups seen last (their ids), and which are not copies.
        self._shape: tuple = ()
        self._outer: set[int] = set()
        self.steered = Steered(worker)
        self.kinds = OptimizerKind(self)  # the built-in `optimizer`
        # Schedulers whose next step is skipped (ids): restored by a rollback inside an
        # optimizer step that changes nothing, they stay at the snapshot's step.
        self.skipping: dict[int, int] = {}
        self._skip_at = 0

    @property
    def steering(self) -> bool:
        """Something is steered: the schedulers' steps look."""
        return self.steered.steering

    @property
    def optimizers(self) -> list:
        live = [o for o in (ref() for ref in self._optimizers) if o is not None]
        if len(live) != len(self._optimizers):
            self._optimizers = [weakref.ref(o) for o in live]
        return live

    def pre_step(self, optimizer, args, kwargs) -> None:
        """The global step pre-hook: the step boundary, when this is the counting optimizer.
        (What is steered goes in through the optimizer's own hooks, which run after it.)"""
        if id(optimizer) == self._primary_id:
            if not self.worker.explicit_steps:
                self.worker.boundary()
            return
        self._meet(optimizer)

    def _meet(self, optimizer) -> None:
        """First sight of an optimizer: track it, publish its keys, make it count if first."""
        if not any(o is optimizer for o in self.optimizers):
            self._optimizers.append(weakref.ref(optimizer))
            hook = getattr(optimizer, "register_state_dict_post_hook", None)
            if hook is not None:  # torch >= 2.2
                hook(_plain_groups)
            if self.publish_targets():
                self.worker.write_schema()
                self.worker.recheck()
        if self._primary_id is None:
            self._primary_id = id(optimizer)
            self._primary_ref = weakref.ref(optimizer, self._primary_gone)
            if not self.worker.explicit_steps:
                self.worker.boundary()

    def publish_targets(self) -> bool:
        """The built-ins the optimizers have now, as targets of the worker (new ones only)."""
        specs = [spec for name, spec in BP.BUILTINS.items() if self.has(name)]
        groups = self.groups()
        if len(groups) > 1:
            specs += [BP.param_group_spec(i) for i in range(len(groups))]
        added = False
        if "optimizer" not in self.worker.targets and (kind := self.kinds.target()):
            self.worker.targets["optimizer"] = kind
            added = True
        for spec in specs:
            if spec.name not in self.worker.targets:
                # The script's own value, as it gave it, before any schedule moved it.
                spec = P._replace(spec, default=self._own(spec.name))
                key = spec.name
                precheck = None
                if is_lr(key):
                    precheck = lambda v, hold=False, key=key: self.check_lr(key, v, hold)  # noqa: E731
                self.worker.targets[key] = Target(
                    spec,
                    lambda key=key: self.get(key),
                    lambda v, hold=False, key=key: self.put(key, v, hold),
                    unset=lambda key=key: self.unset(key),
                    own=lambda key=key: self.own(key),
                    held=lambda key=key: self.held(key),
                    kept=True,
                    precheck=precheck,
                )
                added = True
        return added

    def _own(self, key: str) -> Any:
        """The value the script gave `key`, before any schedule moved it (a scheduler keeps
        it as "initial_lr"); None when it is not a plain value."""
        group = self._group(key)
        if group is None:
            return None
        value = group.get("initial_lr", group["lr"]) if is_lr(key) else group[key]
        try:
            P.to_pb(_plain(value))
        except (TypeError, ValueError, P.ParamError):
            return None
        return _plain(value)

    def _primary_gone(self, _ref) -> None:
        self._primary_id = None

    def is_outer(self, group: dict) -> bool:
        """Not the inner copy of a group an optimizer seen before holds (see groups())."""
        self.groups()  # up to date
        return id(group) in self._outer

    def groups(self) -> list[tuple[Any, int, dict]]:
        """Every param group of every optimizer: (optimizer, index in it, group). A group
        whose parameters an optimizer seen before holds already is an inner copy (torch's
        ZeroRedundancyOptimizer steps an optimizer of its own over a shard of its groups,
        and copies their values into it): it takes its values from the outer one."""
        every = [(o, i, g) for o in self.optimizers for i, g in enumerate(o.param_groups)]
        shape = tuple(id(g) for _, _, g in every)
        if shape != self._shape:  # read with each status: the parameters only when it moved
            outer, seen = set(), set()
            for _, _, group in every:
                params = {id(p) for p in group.get("params", ())}
                if not params or not params <= seen:
                    outer.add(id(group))
                seen |= params
            self._shape, self._outer = shape, outer
        return [entry for entry in every if id(entry[2]) in self._outer]

    def has(self, key: str) -> bool:
        return any(key in g for _, _, g in self.groups())

    def _group(self, key: str) -> dict | None:
        """The param group whose value `key` reads: lr.N's, lr's first, or the first with it."""
        groups = self.groups()
        if is_lr(key):
            index = int(key[3:]) if key != "lr" else 0
            return groups[index][2] if index < len(groups) else None
        return next((g for _, _, g in groups if key in g), None)

    def _kept_of(self, key: str) -> Kept | None:
        group = self._group(key)
        if group is None:
            return None
        kept = self.steered.kept_at(group, "lr" if is_lr(key) else key)
        if kept is None:
            return None
        kept.refresh()  # the script may have written its value for the next step already
        if kept.first is not None:
            kept.first.refresh()
        return kept

    def get(self, key: str) -> Any:
        """The value in effect: the one the next step runs with."""
        kept = self._kept_of(key)
        if kept is not None:
            return _plain(kept.effective())
        group = self._group(key)
        return _plain(group["lr" if is_lr(key) else key]) if group is not None else None

    def own(self, key: str) -> Any:
        """The script's own current value of a steered key (None when not steered)."""
        kept = self._kept_of(key)
        return _plain(kept.own) if kept is not None else None

    def held(self, key: str) -> bool:
        """Held at exactly the value set, by a change to this very name."""
        kept = self._kept_of(key)
        if kept is None:
            return False
        name, rule = kept.active
        return isinstance(rule, Hold) and (name == key or not is_lr(key))

    def put(self, key: str, value: Any, hold: bool = False) -> None:
        """Steer `key` from now on: lr scaled (or held), the other built-ins held."""
        groups = self.groups()
        if not is_lr(key):
            wanted = tuple(value) if key == "betas" else value
            chosen = [(o, g) for o, _, g in groups if key in g]
            for optimizer, group in chosen:
                if key == "momentum" and wanted:
                    _momentum_buffers(optimizer, group)
                self.steered.keep(optimizer, group, key, None).rule(key, Hold(wanted))
            self.steered.arm(key, [o for o, _ in chosen])
            return
        index, chosen, base = self.check_lr(key, value, hold)
        optimizer, _, lead = groups[index]
        first = self.steered.keep(optimizer, lead, "lr", None)
        if hold:
            rules = [Hold(value)] + [HoldRatio(value)] * (len(chosen) - 1)
        else:
            rules = [Scale(value, base, self._floor(g)) for _, _, g in chosen]
        for (optimizer, _, group), rule in zip(chosen, rules, strict=True):
            kept = self.steered.keep(optimizer, group, "lr", first if group is not lead else None)
            kept.rule(key, rule)
        self.steered.arm(key, [o for o, _, _ in chosen])

    def check_lr(self, key: str, value: Any, hold: bool) -> tuple[int, list, float]:
        """Whether lr (lr.N) can take `value` now, before anything is kept (a refusal leaves
        nothing behind; `Worker._apply` asks it before any part of a change is applied):
        the group's index, the groups it goes to, and the script's value new/old is from."""
        groups = self.groups()
        index = int(key[3:]) if key != "lr" else 0
        if index >= len(groups):
            raise P.ParamError(f"there is no param group {index} (there are {len(groups)})")
        chosen = groups if key == "lr" else [groups[index]]
        for _, _, group in chosen:
            if group.get("relative_step"):
                raise P.ParamError(
                    f"{key} cannot be steered: this optimizer computes its own lr "
                    "(relative_step=True, as transformers' Adafactor) and ignores the param "
                    "group's lr; make it with relative_step=False and an lr"
                )
        base = 0.0
        if not hold:
            lead = groups[index][2]
            held = self.steered.kept.get((id(lead), "lr"))
            if held is not None:
                held.refresh()  # what the script wrote since the last step is its own now
            own = held.own if held is not None else _own_of(lead["lr"])
            base = _plain(own) or _plain(lead.get("initial_lr", 0.0))
            if not base:
                raise P.ParamError(
                    f"{key} is 0 in the script's schedule now, so new/old has no ratio: "
                    f"use `--hold` to keep {key} at {P.format_value(value)}, or set it once "
                    "the schedule is above 0"
                )
        return index, chosen, base

    def unset(self, key: str) -> None:
        """Give `key` back to the script: its own value (its schedule) from the next step."""
        self.steered.awaiting.pop(key, None)
        self.steered.forget(key, in_hook=False)

    def _floor(self, group: dict) -> float:
        """An absolute floor the user gave a scheduler of this group (eta_min, min_lrs): the
        scaled schedule stays above it."""
        floor = 0.0
        for scheduler in list(self.schedulers):
            groups = getattr(getattr(scheduler, "optimizer", None), "param_groups", ())
            for index, found in enumerate(groups):
                if found is not group:
                    continue
                eta_min = getattr(scheduler, "eta_min", None)
                if isinstance(eta_min, int | float):
                    floor = max(floor, float(eta_min))
                mins = getattr(scheduler, "min_lrs", None)
                if isinstance(mins, list) and index < len(mins):
                    floor = max(floor, float(mins[index]))
        return floor

    def skip_next_step(self, schedulers: list, counts: dict[int, int]) -> None:
        """A rollback at the boundary inside an optimizer step (whose gradients are None
        now, so it changes nothing): the schedulers it restored skip the steps the script
        takes of them in this step (`counts`, by id: as many as each took per step since
        the snapshot; none for one stepped per epoch), and stay at the snapshot's step as
        the parameters do."""
        found = {id(s): counts.get(id(s), 1) for s in schedulers}  # each `step` is wrapped
        self.skipping = {key: count for key, count in found.items() if count}
        self._skip_at = self.worker.step

    def skips(self, scheduler) -> bool:
        """Whether this call of the scheduler's step is one skipped (in that very step)."""
        if self.worker.step != self._skip_at:
            self.skipping = {}
            return False
        left = self.skipping.get(id(scheduler), 0)
        if not left:
            return False
        if left == 1:
            del self.skipping[id(scheduler)]
        else:
            self.skipping[id(scheduler)] = left - 1
        return True

    def scheduler_step(self, scheduler, step, args, kwargs):
        optimizer = getattr(scheduler, "optimizer", None)
        return self.steered.exposed(optimizer, step, scheduler, *args, **kwargs)

    def last_lrs(self, scheduler, values: list) -> list:
        """A scheduler's last lrs as the steps run with them (the Trainer logs these): for
        a steered group, its value in effect (never what a scheduler's own inner
        schedulers said, SequentialLR's, scaled a second time)."""
        groups = getattr(getattr(scheduler, "optimizer", None), "param_groups", None)
        if not groups or not isinstance(values, list):
            return values
        out = list(values)
        for index, group in enumerate(groups[: len(out)]):
            kept = self.steered.kept_at(group, "lr")
            if kept is not None:
                out[index] = _plain(kept.effective())
        return out


def _momentum_buffers(optimizer, group: dict) -> None:
    """RMSprop makes a parameter's momentum buffer with its state, at its first step, only
    when momentum is above 0 then; momentum steered up from 0 later would find none (a
    KeyError in the script's step). Each gets the zeros RMSprop would have started it at."""
    import torch

    if not isinstance(optimizer, torch.optim.RMSprop):
        return
    for param in group["params"]:
        state = optimizer.state.get(param)
        if state and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _hook_torch(worker: Worker) -> None:
    import torch.optim.lr_scheduler as lr_scheduler
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from loomrun.runtime import group, switch

    if os.environ.get("LOOMRUN_OPTIMIZER_SWITCH", "1") != "0":
        switch.install()
    optimizers = Optimizers(worker)
    worker.snapshots.optimizers = optimizers
    register_optimizer_step_pre_hook(optimizers.pre_step)
    group.install(worker)
    track_schedulers(lr_scheduler.LRScheduler, optimizers)
    try:
        track_loss(worker.metrics)
    except Exception as error:  # noqa: BLE001 - the built-ins work without it
        worker.warn_once(f"cannot take the loss from backward ({error}); report it yourself")


def _plain_groups(optimizer, state: dict) -> dict:
    """A checkpoint holds plain floats: the values in effect, as loomrun's own objects
    would need loomrun to load (and torch.load's weights_only refuses them)."""
    for group in state.get("param_groups", ()):
        for key, value in group.items():
            if type(value) is InEffect:
                group[key] = float(value)
    return state


_tracking: list = [None]  # the worker's Optimizers, which the wrapped `step`s call


def _wrap_step(kind: type) -> None:
    """The scheduler class's `step` (where it is defined: LRScheduler, ReduceLROnPlateau,
    SequentialLR, ...) runs through Optimizers.scheduler_step while something is steered."""
    owner = next((c for c in kind.__mro__ if "step" in c.__dict__), None)
    if owner is None or getattr(owner.__dict__["step"], "_loomrun", False):
        return
    step = owner.__dict__["step"]

    @functools.wraps(step)
    def stepped(scheduler, *args, **kwargs):
        optimizers = _tracking[0]
        if optimizers is None or not (optimizers.steered.steering or optimizers.skipping):
            return step(scheduler, *args, **kwargs)  # every step: no property
        if optimizers.skips(scheduler):
            return None
        return optimizers.scheduler_step(scheduler, step, args, kwargs)

    stepped._loomrun = True
    owner.step = stepped


def track_schedulers(scheduler_class, optimizers: Optimizers) -> None:
    """Know every LR scheduler made (for the floors its user gave it); have each class's
    `step` compute from the script's own values (Optimizers.scheduler_step), and its
    `get_last_lr()` say the lr the steps run with, as the Trainer logs it."""
    original_init = scheduler_class.__init__
    original_last = scheduler_class.get_last_lr
    _tracking[0] = optimizers

    @functools.wraps(original_init)
    def tracked_init(scheduler, *args, **kwargs):
        _wrap_step(type(scheduler))
        if not optimizers.steered.steering:
            original_init(scheduler, *args, **kwargs)
        else:  # made while steering: its base values are the script's, not loomrun's
            optimizer = args[0] if args else kwargs.get("optimizer")
            optimizers.steered.exposed(optimizer, original_init, scheduler, *args, **kwargs)
        optimizers.schedulers.add(scheduler)

    @functools.wraps(original_last)
    def get_last_lr(scheduler):
        values = original_last(scheduler)
        return optimizers.last_lrs(scheduler, values) if optimizers.steered.steering else values

    scheduler_class.__init__ = tracked_init
    scheduler_class.get_last_lr = get_last_lr
    kinds, seen = list(scheduler_class.__subclasses__()), set()
    while kinds:  # torch's own, made already: ReduceLROnPlateau does not call our __init__
        kind = kinds.pop()
        if kind in seen:
            continue
        seen.add(kind)
        kinds.extend(kind.__subclasses__())
        _wrap_step(kind)
        init = kind.__dict__.get("__init__")
        if init is not None and not getattr(init, "_loomrun", False):
            kind.__init__ = _tracking_init(init)


def _tracking_init(init):
    @functools.wraps(init)
    def tracked(scheduler, *args, **kwargs):
        init(scheduler, *args, **kwargs)
        if _tracking[0] is not None:
            _tracking[0].schedulers.add(scheduler)

    tracked._loomrun = True
    return tracked


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after a module's own code has run, the first time it is imported."""

    def __init__(self, name: str, callback):
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_hook(module):
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_then_hook
        return spec


def install(worker: Worker) -> None:
    """Hook torch now if it is loaded, or the moment the user's script imports it."""

    def hook() -> None:
        try:
            _hook_torch(worker)
        except Exception as error:  # noqa: BLE001 - never break the user's import
            worker.warn_once(f"cannot hook torch optimizers ({error}); built-ins are off")

    if "torch.optim" in sys.modules:
        hook()
    else:
        sys.meta_path.insert(0, _AfterImport("torch", hook))
