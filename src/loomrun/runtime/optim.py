"""Zero-code steering of torch optimizers: the step boundary and the built-in parameters.

Nothing here imports torch. The hooks go in when the user's script imports torch (a
post-import hook), so a worker that never uses torch never pays for it.

A global optimizer step pre-hook is the step boundary: the first optimizer seen counts
the steps; changes to lr, momentum, weight_decay and betas are applied before the step
runs. `lr` is the first param group's learning rate, and the other groups keep their
ratio to it (a backbone at a tenth of the head's lr stays at a tenth); with several groups
`lr.0`, `lr.1`, ... set one group exactly. LR schedulers are tracked so that a live lr
change also moves what they compute from: closed-form ones (LambdaLR, OneCycleLR, CyclicLR)
recompute lr from base values every step and would erase the change otherwise.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import weakref
from typing import TYPE_CHECKING, Any

from loomrun import params as P
from loomrun.runtime.target import Target

if TYPE_CHECKING:
    from loomrun.runtime.worker import Worker

BUILTINS = {
    "lr": P.ParamSpec(
        "lr", "float", min=0.0, builtin=True,
        doc="learning rate of the first param group; the others keep their ratio to it",
    ),
    "momentum": P.ParamSpec(
        "momentum", "float", min=0.0, max=1.0, doc="momentum of every param group", builtin=True
    ),
    "weight_decay": P.ParamSpec(
        "weight_decay", "float", min=0.0, doc="weight decay of every param group", builtin=True
    ),
    "betas": P.ParamSpec(
        "betas", "float", is_list=True, length=2, min=0.0, max=1.0,
        doc="Adam-style (beta1, beta2) of every param group", builtin=True,
    ),
}  # fmt: skip
# What schedulers keep in a param group beside "lr" and compute from (OneCycleLR, and
# "initial_lr", which every scheduler made later reads its base from).
_GROUP_ANCHORS = ("initial_lr", "max_lr", "min_lr")
# What they keep per group on themselves: every scheduler's base_lrs and last lr; CyclicLR's
# peaks. Absolute floors (eta_min, ReduceLROnPlateau's min_lrs) stay where the user put them.
_SCHEDULER_LISTS = ("base_lrs", "_last_lr", "max_lrs")


def group_spec(index: int) -> P.ParamSpec:
    return P.ParamSpec(
        f"lr.{index}", "float", min=0.0, builtin=True,
        doc=f"learning rate of param group {index} alone",
    )  # fmt: skip


class Optimizers:
    """The optimizers and schedulers of this worker, and the built-in targets they carry."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self._optimizers: list[weakref.ref] = []  # in the order first seen: lr.N counts on it
        self.schedulers: weakref.WeakSet = weakref.WeakSet()
        # The counting optimizer, held weakly: when a script replaces its optimizer, the next
        # one to step takes over. The id is what the hot path compares; the weakref's callback
        # clears it before the id can be reused.
        self._primary_id: int | None = None
        self._primary_ref = None

    @property
    def optimizers(self) -> list:
        live = [o for o in (ref() for ref in self._optimizers) if o is not None]
        if len(live) != len(self._optimizers):
            self._optimizers = [weakref.ref(o) for o in live]
        return live

    def pre_step(self, optimizer, args, kwargs) -> None:
        """The global step pre-hook: the step boundary, when this is the counting optimizer."""
        if id(optimizer) == self._primary_id:
            if not self.worker.explicit_steps:
                self.worker.boundary()
            return
        self._meet(optimizer)

    def _meet(self, optimizer) -> None:
        """First sight of an optimizer: track it, publish its keys, make it count if first."""
        if not any(o is optimizer for o in self.optimizers):
            self._optimizers.append(weakref.ref(optimizer))
            if self._publish_targets():
                self.worker.write_schema()
                self.worker.recheck()
        if self._primary_id is None:
            self._primary_id = id(optimizer)
            self._primary_ref = weakref.ref(optimizer, self._primary_gone)
            if not self.worker.explicit_steps:
                self.worker.boundary()

    def _publish_targets(self) -> bool:
        specs = [spec for name, spec in BUILTINS.items() if self._has(name)]
        groups = self.groups()
        if len(groups) > 1:
            specs += [group_spec(i) for i in range(len(groups))]
        added = False
        for spec in specs:
            if spec.name not in self.worker.targets:
                # The script's own value, as it gave it: `loomrun unset` goes back to it.
                spec = P._replace(spec, default=self._own(spec.name))
                self.worker.targets[spec.name] = Target(
                    spec,
                    lambda key=spec.name: self.get(key),
                    lambda v, key=spec.name: self.put(key, v),
                )
                added = True
        return added

    def _own(self, key: str) -> Any:
        """The value the script gave `key`, before any schedule moved it (a scheduler keeps
        it as "initial_lr"); None when it is not a plain value."""
        lr = key == "lr" or key.startswith("lr.")
        group = self.groups()[int(key[3:]) if key.startswith("lr.") else 0][2] if lr else None
        value = group.get("initial_lr", group["lr"]) if group is not None else self.get(key)
        try:
            P.to_pb(_plain(value))
        except (TypeError, ValueError, P.ParamError):
            return None
        return _plain(value)

    def _primary_gone(self, _ref) -> None:
        self._primary_id = None

    def groups(self) -> list[tuple[Any, int, dict]]:
        """Every param group of every optimizer: (optimizer, index in it, group)."""
        return [(o, i, g) for o in self.optimizers for i, g in enumerate(o.param_groups)]

    def _has(self, key: str) -> bool:
        return any(key in g for _, _, g in self.groups())

    def get(self, key: str) -> Any:
        if key.startswith("lr."):
            groups = self.groups()
            index = int(key[3:])
            return _plain(groups[index][2]["lr"]) if index < len(groups) else None
        for _, _, group in self.groups():
            if key in group:
                return _plain(group[key])
        return None

    def put(self, key: str, value: Any) -> None:
        groups = self.groups()
        if key.startswith("lr."):
            index = int(key[3:])
            if index >= len(groups):
                raise P.ParamError(f"there is no param group {index} (there are {len(groups)})")
            self._set_lr(*groups[index], value)
        elif key == "lr":
            first = float(_plain(groups[0][2]["lr"])) if groups else 0.0
            for position, (optimizer, index, group) in enumerate(groups):
                lr = value  # the first group exactly; from 0 there is no ratio to keep
                if position and first:
                    lr = float(_plain(group["lr"])) * value / first
                self._set_lr(optimizer, index, group, lr)
        else:
            for _, _, group in groups:
                if key in group:
                    _store(group, key, tuple(value) if key == "betas" else value)

    def _set_lr(self, optimizer, index: int, group: dict, value: float) -> None:
        """One group's lr, and what its schedulers compute it from, scaled alike."""
        old = float(_plain(group["lr"]))

        def moved(anchor: float) -> float:
            return anchor * value / old if old else value

        for anchor in _GROUP_ANCHORS:
            if anchor in group and not hasattr(group[anchor], "fill_"):
                group[anchor] = moved(group[anchor])
        for scheduler in list(self.schedulers):
            if getattr(scheduler, "optimizer", None) is not optimizer:
                continue
            for attribute in _SCHEDULER_LISTS:
                values = getattr(scheduler, attribute, None)
                if isinstance(values, list) and index < len(values):
                    values[index] = moved(_plain(values[index]))
        _store(group, "lr", value)


def _store(group: dict, key: str, value: Any) -> None:
    current = group[key]
    if hasattr(current, "fill_"):  # a tensor lr (capturable optimizers)
        current.fill_(value)
    else:
        group[key] = value


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and hasattr(value, "numel") and value.numel() == 1:
        return value.item()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _hook_torch(worker: Worker) -> None:
    import torch.optim.lr_scheduler as lr_scheduler
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from loomrun.runtime import group

    optimizers = Optimizers(worker)
    register_optimizer_step_pre_hook(optimizers.pre_step)
    group.install(worker)
    original_init = lr_scheduler.LRScheduler.__init__

    def tracked_init(scheduler, *args, **kwargs):
        original_init(scheduler, *args, **kwargs)
        optimizers.schedulers.add(scheduler)

    lr_scheduler.LRScheduler.__init__ = tracked_init
    try:
        _track_loss(worker)
    except Exception as error:  # noqa: BLE001 - the built-ins work without it
        worker.warn_once(f"cannot take the loss from backward ({error}); report it yourself")


def _track_loss(worker: Worker) -> None:
    """A script that reports no loss itself has one all the same: the scalar it calls
    `.backward()` on (under a GradScaler, or a subclass such as FSDP's ShardedGradScaler,
    the loss before scaling). A detached reference is kept (the graph is not: a custom
    autograd Function may hold tensors on it); the worker reads its value when a status
    is due, at most once a second."""
    import torch

    scaled: list = [None, None]  # the last scaled loss, and the loss it was scaled from

    def tracked_backward(self, *args, **kwargs):
        if not worker.own_loss and self.dim() == 0:
            loss = self
            if self is scaled[0]:
                loss = scaled[1]
            worker.metrics["loss"] = loss.detach()
        scaled[0] = scaled[1] = None
        return backward(self, *args, **kwargs)

    def tracking(scale):
        @functools.wraps(scale)
        def tracked_scale(self, outputs):
            out = scale(self, outputs)
            if not worker.own_loss and isinstance(outputs, torch.Tensor) and outputs.dim() == 0:
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
