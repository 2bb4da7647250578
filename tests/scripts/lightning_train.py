"""A small LightningModule trained on CPU, with a handler method and the loomrun callback;
`--csv DIR` logs to a CSVLogger there; `--resume CKPT` resumes from a checkpoint (and says
at which global step it starts)."""

import sys
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import loomrun
from loomrun.lightning import LoomCallback


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.0), nn.Linear(16, 1))

    @loomrun.handler("dropout", min=0.0, max=0.9)
    def set_dropout(self, p: float = 0.0):
        self.net[1].p = p
        print(f"dropout -> {p}", flush=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        time.sleep(0.01)
        return loss

    def on_train_start(self):
        print(f"start at global step {self.trainer.global_step}", flush=True)

    def on_train_epoch_end(self):
        optimizer = self.trainer.optimizers[0]
        lr, kind = optimizer.param_groups[0]["lr"], type(optimizer).__name__
        print(f"epoch {self.current_epoch} lr {lr!r} dropout {self.net[1].p} {kind}", flush=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


if __name__ == "__main__":
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    trainer = L.Trainer(
        max_epochs=30,
        accelerator="cpu",
        devices=1,
        callbacks=[LoomCallback()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=L.pytorch.loggers.CSVLogger(sys.argv[2], name="csv", version=0)
        if sys.argv[1:2] == ["--csv"]
        else False,
    )
    resume = sys.argv[2] if sys.argv[1:2] == ["--resume"] else None
    trainer.fit(Regressor(), data, ckpt_path=resume)
