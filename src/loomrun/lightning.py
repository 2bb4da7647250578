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
        # The tensors themselves: the worker reads their values only when a status is due
        # (a few times a second), so a GPU metric does not sync the device every batch.
        worker.report(
            {k: v for k, v in trainer.callback_metrics.items() if getattr(v, "numel", int)() == 1}
        )
