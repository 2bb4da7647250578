"""The `loomrun` command line: `loomrun [run] [OPTIONS] SCRIPT [ARGS]...` and the steering commands.

Exit codes of `loomrun run`: 0 when every replica finished; the failed replica's own exit
code when one failed past its restarts (128+N when killed by signal N); 130 or 143 when
stopped by SIGINT or SIGTERM; 2 for a usage error, with nothing started.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import secrets
import sys
from pathlib import Path

import click

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class LoomGroup(click.Group):
    """A group whose default command is `run`: `loomrun train.py` means `loomrun run train.py`."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


class RunCommand(click.Command):
    """Keeps the raw arguments, to tell where `-m` stood relative to the script."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["loomrun.raw_args"] = list(args)
        return super().parse_args(ctx, args)


@click.group(cls=LoomGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loomrun")
def main() -> None:
    """Launch a PyTorch job like torchrun, then steer it while it trains.

    \b
      loomrun train.py --replicas 4          start 4 workers (same as `loomrun run ...`)
      loomrun --nproc-per-node 4 train.py    torchrun's spelling works too
      loomrun -m pkg.train -- --lr 0.1       a module, and arguments for it after --
    """


def _job_stem(script: str | None, module: str | None) -> str:
    raw = Path(script).stem if script else (module or "job").rsplit(".", 1)[-1]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-_") or "job"
    return stem[:40]


def default_job_id(script: str | None, module: str | None, nnodes: int, rendezvous: str) -> str:
    """Script name plus a short suffix: random on one node, shared by all nodes of a job."""
    if nnodes > 1:
        suffix = hashlib.sha256(rendezvous.encode()).hexdigest()[:6]
    else:
        suffix = secrets.token_hex(3)
    return f"{_job_stem(script, module)}-{suffix}"


def parse_replica_filter(value: str | None, names: list[str]) -> frozenset[str] | None:
    """`r0,r2` or torchrun's `0,2` (local ranks) into replica names."""
    if value is None:
        return None
    chosen = set()
    for item in (v.strip() for v in value.split(",")):
        if item.isdigit() and int(item) < len(names):
            chosen.add(names[int(item)])
        elif item in names:
            chosen.add(item)
        else:
            raise click.BadParameter(
                f"'{item}' is not a replica of this node (expected one of {', '.join(names)} "
                f"or a local rank 0..{len(names) - 1})",
                param_hint="--replicas-filter",
            )
    return frozenset(chosen)


def _validate_job(ctx, param, value):
    if value is not None and not JOB_ID.match(value):
        raise click.BadParameter(
            f"'{value}' is not a valid job id (expected letters, digits, '-' or '_', "
            "at most 64, starting with a letter or digit)"
        )
    return value


def _module_precedes_script(raw: list[str], script: str) -> bool:
    """True when the script stood after `-m MODULE`, i.e. it is an argument of the module."""
    positions = [
        i for i, a in enumerate(raw) if a in ("-m", "--module") or a.startswith("--module=")
    ]
    return bool(positions) and script in raw[positions[0] :]


@main.command(
    "run",
    cls=RunCommand,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": True},
    epilog="Exit codes: 0 all replicas finished; the failed replica's own code "
    "(128+N for signal N); 130/143 stopped by SIGINT/SIGTERM; 2 usage error.",
)
@click.option(
    "--replicas",
    "--nproc-per-node",
    "--nproc_per_node",
    "replicas",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes on this node (torchrun: --nproc-per-node).",
)
@click.option(
    "-m",
    "--module",
    metavar="MODULE",
    help="Run a module as `python -m MODULE` does, instead of a script.",
)
@click.option(
    "--nnodes", type=click.IntRange(min=1), default=1, show_default=True, help="Number of nodes."
)
@click.option(
    "--node-rank",
    "--node_rank",
    "node_rank",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="This node's rank, 0..nnodes-1.",
)
@click.option(
    "--master-addr",
    "--master_addr",
    "master_addr",
    default=None,
    help="Address of rank 0's node [default: localhost on one node, 127.0.0.1 on several].",
)
@click.option(
    "--master-port",
    "--master_port",
    "master_port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port of rank 0's node [default: a free port on one node, 29500 on several].",
)
@click.option(
    "--standalone",
    is_flag=True,
    help="Accepted for torchrun compatibility: a single-node job (the default).",
)
@click.option(
    "--max-restarts",
    "--max_restarts",
    "max_restarts",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Restarts allowed after a failure before the job fails.",
)
@click.option(
    "--restart-policy",
    type=click.Choice(["group", "replica"]),
    default="group",
    show_default=True,
    help="Restart every replica (what DDP needs) or only the one that failed.",
)
@click.option(
    "--log-dir",
    "--log_dir",
    "log_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write each replica's stdout/stderr to DIR/JOB/attempt_N/rK/.",
)
@click.option(
    "--replicas-filter",
    "--local-ranks-filter",
    "--local_ranks_filter",
    "replicas_filter",
    metavar="LIST",
    default=None,
    help="Show only these replicas on the console, e.g. r0,r2 (or local ranks 0,2).",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds between SIGTERM/SIGINT to the workers and SIGKILL.",
)
@click.option(
    "--job",
    callback=_validate_job,
    default=None,
    help="Job id; scopes everything [default: script name plus a short suffix].",
)
@click.argument("target", nargs=-1, type=click.UNPROCESSED, metavar="SCRIPT [ARGS]...")
@click.pass_context
def run_command(
    ctx: click.Context,
    replicas: int,
    module: str | None,
    nnodes: int,
    node_rank: int,
    master_addr: str | None,
    master_port: int | None,
    standalone: bool,
    max_restarts: int,
    restart_policy: str,
    log_dir: Path | None,
    replicas_filter: str | None,
    grace: float,
    job: str | None,
    target: tuple[str, ...],
) -> None:
    """Start SCRIPT (or -m MODULE) on --replicas worker processes, torchrun-style.

    Options loomrun knows are loomrun's wherever they stand before `--`; everything
    else after the script, and everything after `--`, goes to the script in order.
    Each worker gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, TORCHELASTIC_*, ...) plus LOOMRUN_JOB and LOOMRUN_REPLICA (r0, r1, ...).
    """
    from loomrun.supervisor import LaunchSpec, run

    script, args = None, list(target)
    if module is not None:
        if not module or module.startswith("-") or module.endswith(".py") or "/" in module:
            raise click.BadParameter(
                f"'{module}' is not a module name (expected a dotted name like pkg.train)",
                param_hint="-m",
            )
        if args and not _module_precedes_script(ctx.meta["loomrun.raw_args"], args[0]):
            raise click.UsageError(
                f"got both a script ('{args[0]}') and -m {module}: give one of them"
            )
        _check_module(module)
    else:
        if not args:
            raise click.UsageError("missing SCRIPT (or -m MODULE) to run")
        script = args.pop(0)
        if script.startswith("-"):
            raise click.UsageError(f"no such option: {script}")
        if not Path(script).is_file():
            raise click.BadParameter(
                f"'{script}' does not exist or is not a file", param_hint="SCRIPT"
            )
    if standalone and nnodes > 1:
        raise click.UsageError("--standalone is for one node, but --nnodes is more than 1")
    if node_rank >= nnodes:
        raise click.BadParameter(
            f"{node_rank} is out of range (expected 0..{nnodes - 1} with --nnodes {nnodes})",
            param_hint="--node-rank",
        )
    if master_addr is None:
        master_addr = "localhost" if nnodes == 1 else "127.0.0.1"
    if master_port is None and nnodes > 1:
        master_port = 29500
    job = job or default_job_id(script, module, nnodes, f"{master_addr}:{master_port}")
    names = [f"r{node_rank * replicas + i}" for i in range(replicas)]
    spec = LaunchSpec(
        job=job,
        script=script,
        module=module,
        args=tuple(args),
        nproc=replicas,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        max_restarts=max_restarts,
        restart_policy=restart_policy,
        log_dir=log_dir,
        console_filter=parse_replica_filter(replicas_filter, names),
        grace=grace,
    )
    ctx.exit(run(spec))


def _check_module(module: str) -> None:
    """Look for the top-level package only: finding a submodule would import (run) its parents."""
    top = module.split(".", 1)[0]
    sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = False
    finally:
        sys.path.pop(0)
    if not found:
        raise click.BadParameter(f"no module named '{top}'", param_hint="-m")


if __name__ == "__main__":
    main()
