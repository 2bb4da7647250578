"""A Lightning callback: changes land at batch boundaries, and callback_metrics are reported.

    trainer = Trainer(callbacks=[LoomCallback()])

`@loomrun.handler` methods on the LightningModule work as on any class. Install with
`pip install loomrun[lightning]`. Outside loomrun the callback does nothing.
"""

from __future__ import annotations

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    from pytorch_lightning.callbacks import Callback

from loomrun.runtime import worker as _worker


class LoomCallback(Callback):
    """Makes each training batch a loomrun step and publishes the trainer's metrics."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        worker = _worker.current
        if worker is not None:
            worker.explicit_steps = True
            worker.boundary()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        worker = _worker.current
        if worker is None:
            return
        metrics = {}
        for key, value in trainer.callback_metrics.items():
            if getattr(value, "numel", lambda: 1)() == 1:
                metrics[key] = float(value)
        worker.report(metrics)
