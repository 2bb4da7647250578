"""A Lightning callback: changes land at batch boundaries, the trainer's metrics are
reported, and each applied change goes to the trainer's loggers.

    trainer = Trainer(callbacks=[LoomCallback()])

`@loomrun.handler` methods on the LightningModule work as on any class. `loomrun save DIR`
writes the trainer's own checkpoint (by `trainer.save_checkpoint`: DIR/checkpoint.ckpt for
a process group, DIR/rN.ckpt for a replica of its own), which `trainer.fit(...,
ckpt_path=...)` resumes from. Install with
`pip install loomrun[lightning]`. Outside loomrun the callback does nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    from pytorch_lightning.callbacks import Callback

from loomrun.runtime import worker as _worker


def logged(name: str, value: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """A change as loggers take it: numbers (a list item by item) as metrics under
    `loomrun/`, drawn beside the user's curves; anything else as a hyperparameter."""
    key = f"loomrun/{name}"
    if isinstance(value, bool | int | float):
        return {key: float(value)}, {}
    if isinstance(value, list) and all(isinstance(v, bool | int | float) for v in value):
        return {f"{key}.{i}": float(v) for i, v in enumerate(value)}, {}
    return {}, {key: value}


class LoomCallback(Callback):
    """Makes each training batch a loomrun step, publishes the trainer's metrics, and logs
    every applied change at the trainer's step it took effect at."""

    def __init__(self):
        self._applied: list[tuple[str, Any, int]] = []
        # The trainer's global step at each recent loomrun step (a batch): a change is
        # answered after its optimizer step, and logged at the trainer's step it landed at.
        self._global_steps: dict[int, int] = {}

    def _take(self, name: str, value: Any, step: int) -> None:
        self._applied.append((name, value, step))

    def setup(self, trainer, pl_module, stage: str) -> None:
        worker = _worker.current
        if worker is not None and self._take not in worker.applied_listeners:
            worker.applied_listeners.append(self._take)
        if worker is not None:  # `loomrun save`: the trainer's own checkpoint, for ckpt_path=
            worker.snapshots.saver = trainer.save_checkpoint
        if worker is not None and worker.ignores_usr1:  # the trainer's (SLURM requeue) again
            import signal

            with contextlib.suppress(ValueError):  # not the main thread: left as it is
                if signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN:
                    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
            worker.ignores_usr1 = False

    def teardown(self, trainer, pl_module, stage: str) -> None:
        worker = _worker.current
        if worker is not None and self._take in worker.applied_listeners:
            worker.applied_listeners.remove(self._take)
        if worker is not None and worker.snapshots.saver == trainer.save_checkpoint:
            worker.snapshots.saver = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        worker = _worker.current
        if worker is None:
            return
        worker.explicit_steps = True
        worker.boundary()
        self._global_steps[worker.step] = trainer.global_step
        if len(self._global_steps) > 4096:
            del self._global_steps[next(iter(self._global_steps))]
        if self._applied:
            self._log(trainer, worker)

    def _log(self, trainer, worker) -> None:
        """A logger that refuses a value (MLflow will not change a logged parameter) or
        cannot reach its server costs a warning, never the training run."""
        changes, self._applied = self._applied, []
        for name, value, step in changes:
            if name == "pause":
                continue
            metrics, hyperparameters = logged(name, value)
            for logger in trainer.loggers:
                try:
                    if metrics:
                        at = self._global_steps.get(step, trainer.global_step)
                        logger.log_metrics(metrics, step=at)
                    if hyperparameters:
                        logger.log_hyperparams(hyperparameters)
                except Exception as error:  # noqa: BLE001 - see above
                    worker.warn_once(
                        f"{type(logger).__name__} did not take the change of {name}: {error}"
                    )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        worker = _worker.current
        if worker is None:
            return
        # The tensors themselves: the worker reads their values only when a status is due
        # (a few times a second), so a GPU metric does not sync the device every batch.
        worker.metrics.report(
            {k: v for k, v in trainer.callback_metrics.items() if getattr(v, "numel", int)() == 1}
        )
