"""The built-in parameters: the optimizer values every worker publishes where it trains
with a torch optimizer (lr, momentum, weight_decay, betas, lr.N per param group), and the
kinds `set optimizer=KIND` switches between."""

from __future__ import annotations

from loomrun.params import ParamSpec

# The optimizer values every worker publishes where it trains with a torch optimizer.
BUILTINS = {
    "lr": ParamSpec(
        "lr", "float", min=0.0, builtin=True,
        doc="learning rate (first param group; the others keep their ratio): the script's "
        "schedule times new/old, or held",
    ),
    "momentum": ParamSpec(
        "momentum", "float", min=0.0, max=1.0, doc="momentum of every param group", builtin=True
    ),
    "weight_decay": ParamSpec(
        "weight_decay", "float", min=0.0, doc="weight decay of every param group", builtin=True
    ),
    "betas": ParamSpec(
        "betas", "float", is_list=True, length=2, min=0.0, max=1.0,
        doc="Adam-style (beta1, beta2) of every param group", builtin=True,
    ),
}  # fmt: skip


# The optimizers `set optimizer=KIND` switches to and from: KIND -> its torch.optim class,
# each one that steps a param group as it is and reads its lr at every step (not LBFGS,
# which needs a closure; not SparseAdam, sparse gradients only; not Rprop, whose lr sets
# its step sizes once; not ASGD, which takes an lr one step late).
OPTIMIZERS = {
    "sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop",
    "adagrad": "Adagrad", "adadelta": "Adadelta", "adamax": "Adamax", "nadam": "NAdam",
    "radam": "RAdam",
}  # fmt: skip
# The built-ins each kind has (lr.N, with several param groups, every one).
OPTIMIZER_BUILTINS = {
    "sgd": {"lr", "momentum", "weight_decay"},
    "adam": {"lr", "betas", "weight_decay"},
    "adamw": {"lr", "betas", "weight_decay"},
    "rmsprop": {"lr", "momentum", "weight_decay"},
    "adagrad": {"lr", "weight_decay"},
    "adadelta": {"lr", "weight_decay"},
    "adamax": {"lr", "betas", "weight_decay"},
    "nadam": {"lr", "betas", "weight_decay"},
    "radam": {"lr", "betas", "weight_decay"},
}


def optimizer_spec(default: str) -> ParamSpec:
    return ParamSpec(
        "optimizer", "str", choices=tuple(OPTIMIZERS), builtin=True, default=default,
        doc="the kind of the script's torch optimizer, switched in place at a step (give lr "
        "with it: an SGD lr under AdamW usually diverges)",
    )  # fmt: skip


def param_group_spec(index: int) -> ParamSpec:
    return ParamSpec(
        f"lr.{index}", "float", min=0.0, builtin=True,
        doc=f"learning rate of param group {index} alone",
    )  # fmt: skip
