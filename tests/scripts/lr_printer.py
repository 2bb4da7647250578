"""For the tests' training scripts: print the lr each optimizer step ran with, as
`stepped <n> <lr of each param group>`, from a global step post-hook (it runs right after
the step; loomrun's hooks of the optimizer's own run before it and leave what the step
used)."""

from torch.optim.optimizer import register_optimizer_step_post_hook


def print_each_step(only=None) -> None:
    """Every optimizer's steps, or those of `only`."""
    count = [0]

    def stepped(optimizer, args, kwargs):
        if only is None or optimizer is only:
            count[0] += 1
            lrs = " ".join(repr(group["lr"]) for group in optimizer.param_groups)
            print(f"stepped {count[0]} {lrs}", flush=True)

    register_optimizer_step_post_hook(stepped)
