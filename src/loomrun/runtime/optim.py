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

from loomrun import params as P
from loomrun.runtime.keep import Hold, HoldRatio, InEffect, Kept, Scale, _own_of, _plain
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
        # Each optimizer's own kind and hyperparameters, as the script made it, kept once
        # it is switched to another (runtime.switch): `unset optimizer` goes back to them.
        self._own_kinds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._switched: list = []  # what the last switch did (runtime.switch.Switched)

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
            if self._publish_targets():
                self.worker.write_schema()
                self.worker.recheck()
        if self._primary_id is None:
            self._primary_id = id(optimizer)
            self._primary_ref = weakref.ref(optimizer, self._primary_gone)
            if not self.worker.explicit_steps:
                self.worker.boundary()

    def _publish_targets(self) -> bool:
        specs = [spec for name, spec in P.BUILTINS.items() if self._has(name)]
        groups = self.groups()
        if len(groups) > 1:
            specs += [P.param_group_spec(i) for i in range(len(groups))]
        added = self._publish_switch()
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

    # -- the optimizer's kind (runtime.switch) -------------------------------------------

    def _switchable(self) -> list:
        """The optimizers a switch changes: every one, when each is exactly one of
        torch.optim's kinds and none is the inner copy of another (ZeroRedundancyOptimizer's
        inner optimizer is not switched alone); else none."""
        from loomrun.runtime.switch import kind_of

        optimizers = self.optimizers
        self.groups()  # the outer groups, up to date
        whole = all(id(g) in self._outer for o in optimizers for g in o.param_groups)
        if not optimizers or not whole or any(kind_of(o) is None for o in optimizers):
            return []
        return optimizers

    def _publish_switch(self) -> bool:
        """The built-in `optimizer`, once the script steps with torch.optim optimizers."""
        from loomrun.runtime.switch import installed

        if "optimizer" in self.worker.targets or not installed() or not self._switchable():
            return False
        self.worker.targets["optimizer"] = Target(
            P.optimizer_spec(self.own_kind()),
            self.kind,
            self.switch,
            unset=lambda: self.switch(None),
            own=lambda: self.own_kind() if self.kind() != self.own_kind() else None,
            reshapes=self.reshapes,
            note=self.switch_note,
        )
        return True

    def switch_note(self) -> str:
        """What the last switch did, as it stands now: a key loomrun steers (given in the
        same change, or held before) is not said to be at the new kind's default."""
        steered = {name for name in P.BUILTINS if self.own(name) is not None}
        return "; ".join(dict.fromkeys(s.sentence(steered) for s in self._switched))

    def kind(self) -> str | None:
        """The kind the optimizers step as now (the first one's)."""
        from loomrun.runtime.switch import kind_of

        found = self._switchable()
        return kind_of(found[0]) if found else None

    def own_kind(self) -> str | None:
        """The kind the script made its (first) optimizer as."""
        found = self._switchable()
        if not found:
            return None
        return self._own_kinds[found[0]][0] if found[0] in self._own_kinds else self.kind()

    def reshapes(self, kind: str | None) -> tuple[set[str], set[str]]:
        """The built-ins that appear, and those that go, with a switch to `kind`."""
        if kind not in P.OPTIMIZER_BUILTINS:
            raise P.ParamError(f"no optimizer kind {kind!r}")
        now = {name for name in P.BUILTINS if name in self.worker.targets}
        then = P.OPTIMIZER_BUILTINS[kind]
        return then - now, now - then

    def switch(self, kind: str | None) -> None:
        """Every optimizer to `kind` in place (None: each back to the script's own kind and
        hyperparameters); a built-in that a new kind lacks goes back to the script first,
        and the schema then lists the new kind's."""
        from loomrun.runtime.switch import check, kind_of, switch

        found = self._switchable()
        if not found:
            raise P.ParamError("this replica's optimizers cannot be switched")
        for optimizer in found:
            if optimizer not in self._own_kinds:
                self._own_kinds[optimizer] = (kind_of(optimizer), self._own_values(optimizer))
        wanted = {o: kind or self._own_kinds[o][0] for o in found}
        for optimizer in found:  # before anything changes: all of them, or none
            try:
                check(optimizer, wanted[optimizer], self._schedulers_of(optimizer))
            except ValueError as error:
                raise P.ParamError(str(error)) from None
        having = set.intersection(*(P.OPTIMIZER_BUILTINS[k] for k in wanted.values()))
        lacking = set(P.BUILTINS) - having
        ended = {n: self.own(n) for n in lacking if self.own(n) is not None}
        for name in lacking:
            self.unset(name)  # given back to the script, while its key is there
        if ended:  # a change in effect there ends with its own record
            why = f"the switch to {wanted[found[0]]} took it away"
            self.worker.stepped(set(), ended, dict.fromkeys(ended, why))
        self._switched = []
        for optimizer in found:
            own_kind, own_values = self._own_kinds[optimizer]
            values = own_values if wanted[optimizer] == own_kind else None
            schedulers = self._schedulers_of(optimizer)
            self._switched.append(switch(optimizer, wanted[optimizer], values, schedulers))
        for name in [n for n in self.worker.targets if n in P.BUILTINS and not self._has(n)]:
            del self.worker.targets[name]
        self._publish_targets()
        self.worker.write_schema()

    def _own_values(self, optimizer) -> list[dict]:
        """Each group's hyperparameters as the script has them: what loomrun steers there,
        the script's own value."""
        from loomrun.runtime.switch import hyperparameters

        values = hyperparameters(optimizer)
        for group, found in zip(optimizer.param_groups, values, strict=True):
            for key in found:
                kept = self.steered.kept_at(group, key)
                if kept is not None:
                    kept.refresh()
                    found[key] = _plain(kept.own)
        return values

    def _schedulers_of(self, optimizer) -> list:
        return [s for s in list(self.schedulers) if getattr(s, "optimizer", None) is optimizer]

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

    def _has(self, key: str) -> bool:
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
    register_optimizer_step_pre_hook(optimizers.pre_step)
    group.install(worker)
    track_schedulers(lr_scheduler.LRScheduler, optimizers)
    try:
        _track_loss(worker)
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
        if optimizers is None or not optimizers.steered.steering:  # every step: no property
            return step(scheduler, *args, **kwargs)
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


def _track_loss(worker: Worker) -> None:
    """A script that reports no loss itself has one all the same: the scalar it calls
    `.backward()` on (under a GradScaler, or a subclass such as FSDP's ShardedGradScaler,
    the loss before scaling). A detached reference is kept (the graph is not: a custom
    autograd Function may hold tensors on it); the worker reads its value when a status
    is due, at most once a second."""
    import torch

    scaled: list = [None, None]  # the last scaled loss, and the loss it was scaled from

    def tracked_backward(self, *args, **kwargs):
        if not worker.metrics.own_loss and self.dim() == 0:
            loss = self
            if self is scaled[0]:
                loss = scaled[1]
            worker.metrics.reported["loss"] = loss.detach()
        scaled[0] = scaled[1] = None
        return backward(self, *args, **kwargs)

    def tracking(scale):
        @functools.wraps(scale)
        def tracked_scale(self, outputs):
            out = scale(self, outputs)
            if (
                not worker.metrics.own_loss
                and isinstance(outputs, torch.Tensor)
                and outputs.dim() == 0
            ):
                scaled[0], scaled[1] = out, outputs
            return out

        return tracked_scale

    backward = torch.Tensor.backward
    torch.Tensor.backward = functools.wraps(backward)(tracked_backward)
    scaler = getattr(getattr(torch, "amp", None), "GradScaler", None)  # torch >= 2.3
    if scaler is None:
        return
    kinds, seen = [scaler], []
    while kinds:  # the scaler and those of its subclasses that scale their own way
        kind = kinds.pop()
        seen.append(kind)
        kinds.extend(kind.__subclasses__())
        if "scale" in kind.__dict__:
            kind.scale = tracking(kind.scale)
    made = scaler.__dict__.get("__init_subclass__")

    def init_subclass(cls, **kwargs):  # one defined later (FSDP's, when imported)
        if made is not None:
            made.__func__(cls, **kwargs)
        else:
            super(scaler, cls).__init_subclass__(**kwargs)
        if "scale" in cls.__dict__:
            cls.scale = tracking(cls.scale)

    scaler.__init_subclass__ = classmethod(init_subclass)


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
