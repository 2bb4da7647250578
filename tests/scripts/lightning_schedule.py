"""Lightning with a step-interval scheduler from configure_optimizers: Lightning wraps the
optimizer (LightningOptimizer) and steps the scheduler itself after each optimizer step.
Prints `stepped <n> <lr>`, the lr each step ran with (a global step post-hook registered
before loomrun's)."""

import sys

import lightning as L
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, TensorDataset

count = [0]


def stepped(optimizer, *_):
    count[0] += 1
    print(f"stepped {count[0]} {optimizer.param_groups[0]['lr']!r}", flush=True)


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.01 * s))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


if __name__ == "__main__":
    register_optimizer_step_post_hook(stepped)
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    trainer = L.Trainer(
        max_steps=int(sys.argv[1]) if len(sys.argv) > 1 else 400,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    trainer.fit(Regressor(), data)
