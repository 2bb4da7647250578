"""A Hugging Face Trainer callback: the Trainer's logs become loomrun metrics, and each
applied change goes to the Trainer's `report_to` loggers at the step it took effect at.

    trainer = Trainer(..., callbacks=[loomrun.hf.LoomCallback()])

Changes need no callback: they land at the optimizer's step boundary, as in any script,
and pause holds the Trainer's loop there. Install with `pip install loomrun[hf]`. Outside
loomrun the callback does nothing.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from loomrun import fields
from loomrun.runtime import worker as _worker

_KEPT_STEPS = 4096


def logged(name: str, value: Any) -> dict[str, Any]:
    """A change as the Trainer's loggers take it: a number under `loomrun/NAME`, a string
    as text, a list's items and a structured value's fields each by its path
    (`loomrun/betas/0`, `loomrun/sched/warmup`); nothing else (the ledger has it)."""
    key = f"loomrun/{name}"
    if isinstance(value, bool | int | float):
        return {key: float(value)}
    if isinstance(value, str):
        return {key: value}
    out = {}
    if isinstance(value, dict | list):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for field, inner in items:
            out.update(logged(fields.join(name, field), inner))
    return out


def as_metrics(logs: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in logs.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and not k.startswith("loomrun/")
    }


class LoomCallback(TrainerCallback):
    """Publishes what the Trainer logs (loss, grad_norm, learning_rate, eval metrics) as
    the replica's metrics, and logs every applied change to the Trainer's loggers."""

    def __init__(self):
        self._applied: list[tuple[str, Any, int]] = []
        # loomrun's step of each recent optimizer step -> the Trainer's global step after
        # it: a change is logged at the global step of the optimizer step it landed in.
        self._global_steps: dict[int, int] = {}
        self._loggers: list[TrainerCallback] | None = None

    def _take(self, name: str, value: Any, step: int) -> None:
        self._applied.append((name, value, step))

    def on_init_end(self, args, state, control, **kwargs):
        self._loggers = _loggers()

    def on_train_begin(self, args, state, control, **kwargs):
        if not self._loggers:
            self._loggers = _loggers()
        worker = _worker.current
        if worker is not None and self._take not in worker.applied_listeners:
            worker.applied_listeners.append(self._take)

    def on_train_end(self, args, state, control, **kwargs):
        worker = _worker.current
        # Nothing is logged here: the loggers have closed their writers (they come first),
        # and every change lands in an optimizer step, logged at that step's end.
        if worker is not None and self._take in worker.applied_listeners:
            worker.applied_listeners.remove(self._take)

    def on_step_end(self, args, state, control, **kwargs):
        worker = _worker.current
        if worker is None:
            return
        self._global_steps[worker.step] = state.global_step
        if len(self._global_steps) > _KEPT_STEPS:
            del self._global_steps[next(iter(self._global_steps))]
        if self._applied:
            self._log(args, state, control, kwargs, worker)

    def on_log(self, args, state, control, logs=None, **kwargs):
        worker = _worker.current
        if worker is not None and logs:
            worker.metrics.report(as_metrics(logs))

    def _log(self, args, state, control, kwargs: dict, worker) -> None:
        """Each change to each logger, as the Trainer's own logs go (`on_log`), at the
        global step it took effect at. A logger that refuses it costs a warning, never
        the training run."""
        changes, self._applied = self._applied, []
        kwargs = {k: v for k, v in kwargs.items() if k != "logs"}
        for name, value, step in changes:
            logs = logged(name, value) if name != "pause" else {}
            if not logs:
                continue
            at = copy.copy(state)
            at.global_step = self._global_steps.get(step, state.global_step)
            for logger in self._loggers or ():
                try:
                    logger.on_log(args, at, control, logs=dict(logs), **kwargs)
                except Exception as error:  # noqa: BLE001 - see above
                    worker.warn_once(
                        f"{type(logger).__name__} did not take the change of {name}: {error}"
                    )


def _loggers() -> list[TrainerCallback]:
    """The Trainer's loggers (the callbacks `report_to` made: TensorBoard, W&B, MLflow,
    ...). A callback is handed neither the Trainer nor its other callbacks, so they are
    read from the CallbackHandler that calls this event, a few frames up."""
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            break
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler):
            return [
                callback
                for callback in handler.callbacks
                if type(callback).__module__.startswith("transformers.integrations")
                and type(callback).on_log is not TrainerCallback.on_log
            ]
        frame = frame.f_back
    return []
