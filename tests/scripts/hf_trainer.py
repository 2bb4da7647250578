"""A plain Hugging Face Trainer run: a tiny GPT-2 made from a config (nothing downloaded),
the Trainer's own AdamW and linear-warmup schedule, accelerate underneath; under loomrun
with several replicas, one gloo process group.

With --loom-callback, `loomrun.hf.LoomCallback()` is its one line of loomrun, and the
Trainer reports to TensorBoard. It prints the lr each optimizer step ran with (`stepped
<n> <lr>`, lr_printer) and what the Trainer logs (`logged <global step> <learning_rate>`);
at the end a hash of the weights. It stops at --max-steps, or at the step where the
declared `stop` turns true (on every rank at one step)."""

import argparse
import hashlib
import tempfile

import torch
from lr_printer import print_each_step
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import loomrun
import loomrun.hf

parser = argparse.ArgumentParser()
parser.add_argument("--max-steps", type=int, default=3000)
parser.add_argument("--warmup", type=int, default=10)
parser.add_argument(
    "--loom-callback", action="store_true",
    help="with loomrun.hf.LoomCallback, reporting to TensorBoard (TENSORBOARD_LOGGING_DIR)",
)  # fmt: skip
args = parser.parse_args()


class Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int):
        generator = torch.Generator().manual_seed(0)
        self.rows = torch.randint(64, (count, 16), generator=generator)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


stop = loomrun.param("stop", bool, default=False, doc="end the run after this step")


class Printed(TrainerCallback):
    def on_log(self, arguments, state, control, logs=None, **kwargs):
        if logs and "learning_rate" in logs:
            print(f"logged {state.global_step} {logs['learning_rate']!r}", flush=True)

    def on_step_end(self, arguments, state, control, **kwargs):
        if stop.value:
            control.should_training_stop = True

    def on_train_end(self, arguments, state, control, model=None, **kwargs):
        inner = getattr(kwargs.get("optimizer"), "optimizer", kwargs.get("optimizer"))
        print(f"optimizer {type(inner).__name__}", flush=True)  # under accelerate's wrapper
        weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
        print(f"hash {hashlib.sha256(weights).hexdigest()}", flush=True)


print_each_step()
torch.manual_seed(0)
config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
with tempfile.TemporaryDirectory() as output:
    training = TrainingArguments(
        output_dir=output,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup,
        logging_steps=1,
        save_strategy="no",
        report_to=["tensorboard"] if args.loom_callback else [],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=training,
        train_dataset=Tokens(4096),
        callbacks=[Printed(), *([loomrun.hf.LoomCallback()] if args.loom_callback else [])],
    )
    trainer.train()
