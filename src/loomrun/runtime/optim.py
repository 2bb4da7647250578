"""Zero-code steering of torch optimizers: the step boundary and the built-in parameters.

Nothing here imports torch. The hooks go in when the user's script imports torch (a
post-import hook), so a worker that never uses torch never pays for it.

A global optimizer step pre-hook is the step boundary: the first optimizer seen counts
the steps; changes to lr, momentum, weight_decay and betas are applied to every param
group of every optimizer before the step runs. LR schedulers are tracked so that a live
lr change also moves what they compute from (closed-form schedulers such as LambdaLR and
OneCycleLR recompute lr from base_lrs every step and would erase it otherwise).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import weakref
from typing import Any

from loomrun import params as P
from loomrun.runtime.worker import Target, Worker

BUILTINS = {
    "lr": P.ParamSpec(
        "lr", "float", min=0.0, doc="learning rate of every param group", builtin=True
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
# Keys a scheduler keeps beside "lr" in a param group and computes from (OneCycleLR, CyclicLR).
_LR_ANCHORS = ("initial_lr", "max_lr", "min_lr", "base_lr")


class Optimizers:
    """The optimizers and schedulers of this worker, and the built-in targets they carry."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.optimizers: weakref.WeakSet = weakref.WeakSet()
        self.schedulers: weakref.WeakSet = weakref.WeakSet()
        # The counting optimizer, held weakly: when a script replaces its optimizer, the next
        # one to step takes over. The id is what the hot path compares; the weakref's callback
        # clears it before the id can be reused.
        self._primary_id: int | None = None
        self._primary_ref = None

    def pre_step(self, optimizer, args, kwargs) -> None:
        """The global step pre-hook: the step boundary, when this is the counting optimizer."""
        if id(optimizer) == self._primary_id:
            if not self.worker.explicit_steps:
                self.worker.boundary()
            return
        self._meet(optimizer)

    def _meet(self, optimizer) -> None:
        """First sight of an optimizer: track it, publish its keys, make it count if first."""
        if optimizer not in self.optimizers:
            self.optimizers.add(optimizer)
            added = False
            for name, spec in BUILTINS.items():
                if name not in self.worker.targets and self._has(name):
                    self.worker.targets[name] = Target(
                        spec, lambda key=name: self.get(key), lambda v, key=name: self.put(key, v)
                    )
                    added = True
            self.worker.awaiting = frozenset()
            if added:
                self.worker.write_schema()
                self.worker.recheck()
        if self._primary_id is None:
            self._primary_id = id(optimizer)
            self._primary_ref = weakref.ref(optimizer, self._primary_gone)
            if not self.worker.explicit_steps:
                self.worker.boundary()

    def _primary_gone(self, _ref) -> None:
        self._primary_id = None

    def _has(self, key: str) -> bool:
        return any(key in g for o in self.optimizers for g in o.param_groups)

    def get(self, key: str) -> Any:
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                if key in group:
                    return _plain(group[key])
        return None

    def put(self, key: str, value: Any) -> None:
        for optimizer in list(self.optimizers):
            for index, group in enumerate(optimizer.param_groups):
                if key not in group:
                    continue
                if key == "lr":
                    self._move_schedules(optimizer, index, group, value)
                current = group[key]
                if hasattr(current, "fill_"):  # a tensor lr (capturable optimizers)
                    current.fill_(value)
                else:
                    group[key] = tuple(value) if key == "betas" else value

    def _move_schedules(self, optimizer, index: int, group: dict, value: float) -> None:
        old = float(_plain(group["lr"]))
        scale = value / old if old else None
        for anchor in _LR_ANCHORS:
            if anchor in group and not hasattr(group[anchor], "fill_"):
                group[anchor] = group[anchor] * scale if scale is not None else value
        for scheduler in list(self.schedulers):
            if getattr(scheduler, "optimizer", None) is not optimizer:
                continue
            base = getattr(scheduler, "base_lrs", None)
            if base is not None and index < len(base):
                base[index] = base[index] * scale if scale is not None else value
            last = getattr(scheduler, "_last_lr", None)
            if last is not None and index < len(last):
                last[index] = value


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and hasattr(value, "numel") and value.numel() == 1:
        return value.item()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _hook_torch(worker: Worker) -> None:
    import torch.optim.lr_scheduler as lr_scheduler
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    optimizers = Optimizers(worker)
    register_optimizer_step_pre_hook(optimizers.pre_step)
    original_init = lr_scheduler.LRScheduler.__init__

    def tracked_init(scheduler, *args, **kwargs):
        original_init(scheduler, *args, **kwargs)
        optimizers.schedulers.add(scheduler)

    lr_scheduler.LRScheduler.__init__ = tracked_init


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

    worker.awaiting = frozenset(BUILTINS)
    if "torch.optim" in sys.modules:
        hook()
    else:
        sys.meta_path.insert(0, _AfterImport("torch", hook))
