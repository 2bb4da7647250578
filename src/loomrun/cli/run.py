"""`loomrun run`: torchrun's flags into a LaunchSpec (loomrun.launch checks them), then
the supervisor."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from loomrun.cli.options import Seconds, broker_flags, broker_of, validate_job


class RunCommand(click.Command):
    """Keeps the raw arguments, to tell where `-m` stood relative to the script."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["loomrun.raw_args"] = list(args)
        return super().parse_args(ctx, args)


def writable_dir(ctx, param, value: Path | None) -> Path | None:
    """A folder the job can write into, made if it is not there: said before anything
    starts, not as a traceback once the workers run."""
    if value is not None:
        try:
            value.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise click.BadParameter(f"cannot make the folder {value}: {error.strerror}") from None
        if not os.access(value, os.W_OK | os.X_OK):
            raise click.BadParameter(f"cannot write into the folder {value}")
    return value


class ProcCount(click.ParamType):
    """torchrun's --nproc-per-node: a whole number >= 1, or gpu, cpu, auto."""

    name = "N|gpu|cpu|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text in ("gpu", "cpu", "auto"):
            return text
        try:
            count = int(text)
        except ValueError:
            count = 0
        if count < 1:
            self.fail(
                f"{value!r} is not a number of workers (expected 1, 2, ..., gpu, cpu or auto)"
            )
        return count


@click.command(
    "run",
    cls=RunCommand,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": True},
    epilog="Exit codes: 0 all replicas finished; the failed replica's own code "
    "(128+N for signal N); 130/143/129 stopped by SIGINT/SIGTERM/SIGHUP; 2 usage error.",
)
@click.option(
    "--replicas",
    "--nproc-per-node",
    "--nproc_per_node",
    "replicas",
    type=ProcCount(),
    default="1",
    show_default=True,
    help="Worker processes on this node (torchrun: --nproc-per-node): a number, or gpu "
    "(one per visible GPU, counted with NVML), cpu (one per CPU), auto (gpu if there is "
    "one, else cpu).",
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
    default=None,
    help="This node's rank, 0..nnodes-1 [default: 0; with --rdzv-backend c10d, agreed].",
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
    "--rdzv-backend",
    "--rdzv_backend",
    type=click.Choice(["static", "c10d"]),
    default="static",
    show_default=True,
    help="How nodes find their ranks: static (--node-rank on each node) or c10d (the same "
    "command on every node; ranks agreed at --rdzv-endpoint, through torch's TCPStore).",
)
@click.option(
    "--rdzv-endpoint",
    "--rdzv_endpoint",
    metavar="HOST[:PORT]",
    default=None,
    help="Where the nodes meet with --rdzv-backend c10d (port 29400 if left out); the node "
    "that can bind it hosts the store.",
)
@click.option(
    "--rdzv-id",
    "--rdzv_id",
    callback=validate_job,
    default=None,
    help="The rendezvous' id, the same on every node; also the job id unless --job is given.",
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
    callback=writable_dir,
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
    type=Seconds(min=0),
    default=30.0,
    show_default=True,
    help="Seconds between SIGTERM/SIGINT to the workers and SIGKILL.",
)
@click.option(
    "--step-timeout",
    type=Seconds(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Stop a replica that takes no step for this long (after its first) and restart "
    "it per --restart-policy [default: off; a hang is only shown].",
)
@click.option(
    "--job",
    callback=validate_job,
    default=None,
    help="Job id; scopes everything [default: script name plus a short suffix].",
)
@click.option(
    "--replay",
    metavar="CHANGES",
    default=None,
    help="Apply the applied changes of a ledger (a changes.jsonl, or a job id) to the same "
    "replicas at the same steps: a seeded steered run, again.",
)
@click.option(
    "--snapshot-every",
    type=click.IntRange(0, 2**62),
    default=0,
    metavar="N",
    help="Snapshot the training state in host memory every N steps, so that `loomrun "
    "rollback` always has one to go to [default: 0, none].",
)
@click.option(
    "--snapshot-keep",
    type=click.IntRange(1, 100),
    default=None,
    metavar="K",
    help="How many of --snapshot-every's snapshots are kept, the newest [default: 2].",
)
@click.option(
    "--save-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where SIGUSR1 to the supervisor saves a checkpoint of every replica (as `loomrun "
    "save`), in usr1-N-step-S [default: the job's folder in the state directory, saves/].",
)
@click.option(
    "--rules",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Rules that steer the job by themselves from its start (a TOML file, one table "
    "per rule: when, then, cooldown, across, replicas; see `loomrun rule add --help`).",
)
@broker_flags
@click.option(
    "--wait-broker",
    is_flag=True,
    help="Keep trying a remote broker that does not answer, instead of running uncontrolled.",
)
@click.option(
    "--no-broker", is_flag=True, help="Run without live control: no NATS at all, like torchrun."
)
@click.argument("target", nargs=-1, type=click.UNPROCESSED, metavar="SCRIPT [ARGS]...")
@click.pass_context
def run_command(ctx: click.Context, target: tuple[str, ...], **options) -> None:
    """Start SCRIPT (or -m MODULE) on --replicas worker processes, torchrun-style.

    Options loomrun knows are loomrun's wherever they stand before `--`; everything
    else after the script, and everything after `--`, goes to the script in order.
    Each worker gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, TORCHELASTIC_*, ...) plus LOOMRUN_JOB and LOOMRUN_REPLICA (r0, r1, ...).
    """
    from loomrun.launch import LaunchError, RunOptions
    from loomrun.rendezvous import RendezvousError
    from loomrun.supervisor import run

    raw = ctx.meta["loomrun.raw_args"]
    broker = options.pop("nats_url"), options.pop("nats_creds"), options.pop("nats_ca")
    options["broker"] = None if options.pop("no_broker") else broker_of(*broker)
    run_options = RunOptions(**options)
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    try:
        spec = run_options.spec(target, raw, say=say)
        taken = _own_options_after(raw, spec.module or spec.script, ctx.command)
        if taken:
            them = "it" if len(taken) == 1 else "them"
            say(
                f"loomrun: took {', '.join(taken)} after the script as loomrun's own; to pass "
                f"{them} to the script instead, put {them} after `--`"
            )
        if spec.broker is not None and not spec.wait_broker:
            _check_remote_broker(spec.broker)
        if run_options.rdzv_backend == "c10d":  # last: a node that cannot start takes no rank
            spec = run_options.spec(target, raw, agreed=run_options.agree(say), say=say)
    except LaunchError as error:
        if error.option is None:
            raise click.UsageError(str(error)) from None
        raise click.BadParameter(str(error), param_hint=error.option) from None
    except RendezvousError as error:
        say(f"Error: {error}")
        sys.exit(1)
    ctx.exit(run(spec))


def _own_options_after(raw: list[str], target: str, command: click.Command) -> list[str]:
    """loomrun's options that stood after the script (and before `--`): a script with an
    option of the same name would silently lose it, so the user is told."""
    names = {o for p in command.params if isinstance(p, click.Option) for o in p.opts}
    end = raw.index("--") if "--" in raw else len(raw)
    if target not in raw[:end]:
        return []
    after = raw[raw.index(target) + 1 : end]
    return list(dict.fromkeys(a.split("=", 1)[0] for a in after if a.split("=", 1)[0] in names))


def _check_remote_broker(options) -> None:
    """A remote broker that does not answer is an error before anything starts."""
    from loomrun.broker.connect import host_port, is_loopback, reach

    if is_loopback(options.url):
        return  # the bundled broker starts itself there
    host, port = host_port(options.url)
    try:
        reach(host, port, 3).close()
    except OSError as error:
        raise click.ClickException(
            f"cannot reach the NATS broker at {options.url} ({error.strerror or error}); "
            "start it, pass --wait-broker to keep trying, or --no-broker to run without it"
        ) from None
