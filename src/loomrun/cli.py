"""The `loomrun` command line: `loomrun [run] [OPTIONS] SCRIPT [ARGS]...` and the steering commands.

Exit codes of `loomrun run`: 0 when every replica finished; the failed replica's own exit
code when one failed past its restarts (128+N when killed by signal N); 130, 143 or 129 when
stopped by SIGINT, SIGTERM or SIGHUP; 2 for a usage error, with nothing started.

Exit codes of `set`, `pause`, `resume`: 0 every targeted replica applied the change; 1 some
did not (rejected it, missed its step, or a later change replaced it first); 3 timed out
(the change stays desired and will still apply); 2 usage error, nothing written; 4 the
broker cannot be reached.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
EXIT_REJECTED, EXIT_TIMED_OUT, EXIT_NO_BROKER = 1, 3, 4


def broker_options(f):
    """--nats, --nats-creds and --nats-ca for every command; a token comes from the environment."""
    f = click.option(
        "--nats-ca",
        type=click.Path(dir_okay=False, exists=True),
        envvar="LOOMRUN_NATS_CA",
        help="CA file for a tls:// broker.",
    )(f)
    f = click.option(
        "--nats-creds",
        type=click.Path(dir_okay=False, exists=True),
        envvar="LOOMRUN_NATS_CREDS",
        help="NATS credentials file (JWT and NKey seed).",
    )(f)
    f = click.option(
        "--nats",
        "nats_url",
        envvar="LOOMRUN_NATS",
        default="nats://127.0.0.1:4222",
        show_default=True,
        metavar="URL",
        help="NATS broker [env LOOMRUN_NATS; token from LOOMRUN_NATS_TOKEN].",
    )(f)
    return f


def _broker(nats_url: str, nats_creds: str | None, nats_ca: str | None):
    from loomrun.broker import BrokerError, BrokerOptions, host_port

    try:
        host_port(nats_url)
    except BrokerError as error:
        raise click.BadParameter(str(error), param_hint="--nats") from None
    token = os.environ.get("LOOMRUN_NATS_TOKEN") or None
    return BrokerOptions(nats_url, creds=nats_creds, token=token, ca=nats_ca)


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


def parse_replica_filter(
    value: str | None, names: list[str], elsewhere: list[str] = ()
) -> frozenset[str] | None:
    """`r0,r2` or torchrun's `0,2` (local ranks) into replica names; names of the job's
    other nodes (`elsewhere`: the same command runs on every node) are left out."""
    if value is None:
        return None
    chosen = set()
    for item in (v.strip() for v in value.split(",")):
        if item.isdigit() and int(item) < len(names):
            chosen.add(names[int(item)])
        elif item in names:
            chosen.add(item)
        elif item in elsewhere:
            continue
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


def _writable_dir(ctx, param, value: Path | None) -> Path | None:
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


class Seconds(click.FloatRange):
    """A number of seconds: click's FloatRange lets nan and inf through, and "--grace nan"
    killed at once."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return number


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


def proc_count(value: int | str) -> int:
    """--nproc-per-node as a number: gpu and auto count the GPUs NVML sees (as CUDA would,
    CUDA_VISIBLE_DEVICES included), as torchrun counts them with CUDA."""
    if isinstance(value, int):
        return value
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if value == "cpu":
        return cpus or 1  # the CPUs this process may use (taskset, cgroups), as torch counts
    from loomrun.devices import Devices

    devices = Devices()
    try:
        gpus = devices.count()
    finally:
        devices.close()
    if value == "gpu" and gpus == 0:
        raise click.BadParameter(
            "gpu: NVML sees no GPU on this node", param_hint="--nproc-per-node"
        )
    return gpus or cpus or 1


@main.command(
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
    callback=_validate_job,
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
    callback=_writable_dir,
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
    callback=_validate_job,
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
@broker_options
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
    from loomrun.supervisor import run

    raw = ctx.meta["loomrun.raw_args"]
    run_options = RunOptions(**options)
    spec = run_options.spec(target, raw)
    taken = _own_options_after(raw, spec.module or spec.script, ctx.command)
    if taken:
        click.echo(
            f"loomrun: took {', '.join(taken)} after the script as loomrun's own; to pass "
            f"{'it' if len(taken) == 1 else 'them'} to the script instead, put "
            f"{'it' if len(taken) == 1 else 'them'} after `--`",
            err=True,
        )
    if spec.broker is not None and not spec.wait_broker:
        _check_remote_broker(spec.broker)
    if run_options.rdzv_backend == "c10d":  # last: a node that cannot start takes no rank
        spec = run_options.spec(target, raw, agreed=run_options.agree())
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


@dataclass(frozen=True)
class RunOptions:
    """`loomrun run`'s options as click parsed them; `spec` checks them together."""

    replicas: int | str
    module: str | None
    nnodes: int
    node_rank: int | None
    rdzv_backend: str
    rdzv_endpoint: str | None
    rdzv_id: str | None
    master_addr: str | None
    master_port: int | None
    standalone: bool
    max_restarts: int
    restart_policy: str
    log_dir: Path | None
    replicas_filter: str | None
    grace: float
    step_timeout: float | None
    job: str | None
    replay: str | None
    nats_url: str
    nats_creds: str | None
    nats_ca: str | None
    wait_broker: bool
    no_broker: bool

    def spec(self, target: tuple[str, ...], raw_args: list[str], agreed=None):
        """The validated LaunchSpec; a usage error names the option that is wrong. With
        --rdzv-backend c10d, `agreed` is the rendezvous' (node rank, master address, master
        port); without it the options are checked against every node's replicas."""
        from loomrun.supervisor import LaunchSpec

        script, args = self._target(target, raw_args)
        nproc = proc_count(self.replicas)
        if self.standalone and self.nnodes > 1:
            raise click.UsageError("--standalone is for one node, but --nnodes is more than 1")
        node_rank = self.node_rank or 0
        if node_rank >= self.nnodes:
            raise click.BadParameter(
                f"{node_rank} is out of range (expected 0..{self.nnodes - 1} with "
                f"--nnodes {self.nnodes})",
                param_hint="--node-rank",
            )
        master_addr = self.master_addr or ("localhost" if self.nnodes == 1 else "127.0.0.1")
        master_port = self.master_port
        if master_port is None and self.nnodes > 1:
            master_port = 29500
        rendezvous = f"{master_addr}:{master_port}"
        if self.rdzv_backend == "c10d":
            self._check_rendezvous()
            rendezvous = self.rdzv_endpoint
            if agreed is not None:
                node_rank, master_addr, master_port = agreed
        # Before a c10d rendezvous, node 0's names stand in: the checks of --replicas-filter
        # and --replay are then the same for whichever rank this node gets.
        names = [f"r{node_rank * nproc + i}" for i in range(nproc)]
        elsewhere = [f"r{i}" for i in range(self.nnodes * nproc) if f"r{i}" not in names]
        job = (
            self.job or self.rdzv_id or default_job_id(script, self.module, self.nnodes, rendezvous)
        )
        broker = None
        if not self.no_broker:
            broker = _broker(self.nats_url, self.nats_creds, self.nats_ca)
        return LaunchSpec(
            job=job,
            script=script,
            module=self.module,
            args=tuple(args),
            nproc=nproc,
            nnodes=self.nnodes,
            node_rank=node_rank,
            master_addr=master_addr,
            master_port=master_port,
            max_restarts=self.max_restarts,
            restart_policy=self.restart_policy,
            log_dir=self.log_dir,
            console_filter=parse_replica_filter(self.replicas_filter, names, elsewhere),
            grace=self.grace,
            step_timeout=self.step_timeout,
            replay=self._replay(names, quiet=self.rdzv_backend == "c10d" and agreed is None),
            broker=broker,
            wait_broker=self.wait_broker,
        )

    def _check_rendezvous(self) -> None:
        from loomrun import rendezvous

        if self.node_rank is not None:
            raise click.UsageError(
                "--node-rank is agreed with --rdzv-backend c10d: leave it out (or use "
                "--rdzv-backend static)"
            )
        if not self.rdzv_endpoint or not self.rdzv_id:
            raise click.UsageError("--rdzv-backend c10d needs --rdzv-endpoint HOST[:PORT] and "
                                   "--rdzv-id, the same on every node")  # fmt: skip
        if self.master_addr or self.master_port:
            raise click.UsageError("the master is agreed with --rdzv-backend c10d: leave out "
                                   "--master-addr and --master-port")  # fmt: skip
        try:
            rendezvous.endpoint(self.rdzv_endpoint)
        except rendezvous.RendezvousError as error:
            raise click.BadParameter(str(error), param_hint="--rdzv-endpoint") from None

    def agree(self) -> tuple[int, str, int]:
        """--rdzv-backend c10d: this node's rank and the master, agreed with the others."""
        from loomrun import rendezvous

        if self.nnodes == 1:
            return 0, "localhost", 0
        click.echo(f"loomrun: waiting for {self.nnodes} nodes at {self.rdzv_endpoint}", err=True)
        try:
            nproc = proc_count(self.replicas)
            found = rendezvous.agree(self.rdzv_endpoint, self.nnodes, nproc, self.rdzv_id)
        except rendezvous.RendezvousError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(1)
        click.echo(
            f"loomrun: node rank {found.node_rank} of {self.nnodes}, master "
            f"{found.master_addr}:{found.master_port}", err=True,
        )  # fmt: skip
        return found.node_rank, found.master_addr, found.master_port

    def _replay(self, names: list[str], quiet: bool = False) -> dict[str, list] | None:
        if self.replay is None:
            return None
        from loomrun.replay import ReplayError, load, schedules

        try:
            plans, missing = schedules(load(self.replay), names)
        except ReplayError as error:
            raise click.BadParameter(str(error), param_hint="--replay") from None
        count = sum(len(plan) for plan in plans.values())
        if quiet:
            return plans
        click.echo(f"loomrun: replaying {count} change(s) from {self.replay}", err=True)
        if missing:
            click.echo(
                f"loomrun: the record has changes for {', '.join(missing)}, which this job "
                "does not have: skipped",
                err=True,
            )
        return plans

    def _target(self, target: tuple[str, ...], raw_args: list[str]):
        """The script (None for -m) and the arguments that go to it."""
        module, args = self.module, list(target)
        if module is not None:
            if not module or module.startswith("-") or module.endswith(".py") or "/" in module:
                raise click.BadParameter(
                    f"'{module}' is not a module name (expected a dotted name like pkg.train)",
                    param_hint="-m",
                )
            if args and not _module_precedes_script(raw_args, args[0]):
                raise click.UsageError(
                    f"got both a script ('{args[0]}') and -m {module}: give one of them"
                )
            _check_module(module)
            return None, args
        if not args:
            raise click.UsageError("missing SCRIPT (or -m MODULE) to run")
        script = args.pop(0)
        if script.startswith("-"):
            raise click.UsageError(f"no such option: {script}")
        if not Path(script).is_file():
            raise click.BadParameter(
                f"'{script}' does not exist or is not a file", param_hint="SCRIPT"
            )
        return script, args


def _check_remote_broker(options) -> None:
    """A remote broker that does not answer is an error before anything starts."""
    from loomrun.broker import host_port, is_loopback, reach

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


def _steer(options, work):
    """Run `work(steering)` against the broker; its errors become one-line CLI errors."""
    import asyncio

    from loomrun.broker import BrokerError
    from loomrun.client import SteerError, Steering
    from loomrun.printable import printable

    async def session():
        async with Steering.connect(options) as steering:
            return await work(steering)

    try:
        return asyncio.run(session())
    except SteerError as error:
        raise click.UsageError(printable(error)) from None
    except BrokerError as error:
        click.echo(f"Error: {printable(error)}", err=True)
        sys.exit(EXIT_NO_BROKER)


def _replica_list(ctx, param, values: tuple[str, ...]) -> list[str] | None:
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if values and not names:  # `--replica "$R"` with R unset: not every replica
        raise click.BadParameter("no replica named (expected r0, r1, ...)")
    for name in names:
        if not re.fullmatch(r"r\d+", name):
            raise click.BadParameter(f"'{name}' is not a replica name (expected r0, r1, ...)")
    return names or None


def _parse_assignments(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    from loomrun.subjects import PARAM_NAME

    changes: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not PARAM_NAME.match(name):
            raise click.BadParameter(f"'{item}' is not KEY=VALUE (like lr=0.002)")
        changes[name] = value
    return changes


def steering_options(f):
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(f)
    f = click.option("--no-wait", is_flag=True, help="Write the change and return at once.")(f)
    f = click.option(
        "--timeout",
        type=Seconds(min=0),
        default=30.0,
        show_default=True,
        help="Seconds to wait for every replica's answer.",
    )(f)
    f = click.option(
        "--force",
        is_flag=True,
        help="Change only some ranks of a process group, although they will then differ.",
    )(f)
    f = click.option(
        "--at-step",
        type=click.IntRange(1, 2**63 - 1),
        default=None,
        help="Apply at exactly this step number, or nowhere if a replica is past it "
        "[default: at once; ranks of a process group: at one step they agree on].",
    )(f)
    f = click.option(
        "--replica",
        "replicas",
        multiple=True,
        callback=_replica_list,
        metavar="r1,r2",
        help="Only these replicas [default: all of the job's].",
    )(f)
    f = click.option(
        "--job", callback=_validate_job, help="Job id [default: the only running job]."
    )(f)
    return broker_options(f)


def _report(results, as_json: bool, job: str | None, waited: bool) -> int:
    """Print what became of each change, each line from that change's own answer; return
    the exit code it means."""
    import json

    from loomrun import client
    from loomrun.params import format_value
    from loomrun.printable import printable

    def say(line: str) -> None:
        click.echo(printable(line))  # names, values and reasons come from the broker

    summary = client.summary(results) if waited else "written"
    code = {"written": 0, "applied": 0, "timed out": EXIT_TIMED_OUT}.get(summary, EXIT_REJECTED)
    if as_json:
        found = results[0].job if results else job
        changes = [r.as_dict() for r in results]
        click.echo(json.dumps({"job": found, "result": summary, "changes": changes}))
        return code
    for r in results:
        d = r.as_dict()
        head = f"{r.replica}  {r.name}"
        if not waited:
            say(f"{head}  = {format_value(r.requested)}  written (change {r.change_id})")
        elif r.state == "timed out":
            say(f"{head}  no answer yet: still desired, it applies when the replica gets to it")
        elif r.state == "rejected":
            say(f"{head}  rejected: {d['reason']}")
        elif r.state == "missed":
            say(f"{head}  not applied: {d['reason']}")
        elif r.state == "superseded":
            say(f"{head}  not applied: a later change to {r.name} reached {r.replica} first")
        elif r.state == "not running":
            say(f"{head}  not sent: {r.replica} is not running ({r.not_running})")
        elif r.state == "overridden":
            say(f"{head}  overridden at step {d['step']}, not in effect: {d['reason']}")
        elif r.name == "pause":
            word = "paused" if d["new"] else "resumed"
            say(f"{r.replica}  {word} at step {d['step']}  ({d['latency_ms']:.1f} ms)")
        else:
            change = f"{format_value(d['old'])} -> {format_value(d['new'])}"
            how = {"hold": "  held", "unset": "  (the script's)"}.get(d["kind"], "")
            say(f"{head}  {change}{how}  at step {d['step']}  ({d['latency_ms']:.1f} ms)")
    return code


EXIT_CODES = (
    "Exit codes: 0 applied; 1 not applied or not in effect (rejected, overridden by the "
    "script's optimizer, missed its step, replaced by a later change, or the replica is not "
    "running); 3 timed out; 2 usage; 4 no broker."
)


@main.command("set", epilog=EXIT_CODES)
@click.argument(
    "assignments", nargs=-1, required=True, callback=_parse_assignments, metavar="KEY=VALUE..."
)
@click.option(
    "--hold",
    is_flag=True,
    help="Keep lr (lr.N) at exactly this value whatever the script's schedule says, until "
    "the next change or unset [default: the schedule times new/old].",
)
@steering_options
def set_command(
    assignments, hold, job, replicas, at_step, force, timeout, no_wait, as_json, **broker
):
    """Change parameters of a running job, between two steps.

    \b
      loomrun set lr=0.002                   every replica of the only running job
      loomrun set lr=1e-3 momentum=0.8 --replica r1 --job train-1a2b3c
      loomrun set lr.1=1e-4                  only the second param group's lr
      loomrun set lr=3e-4 --hold             stop the decay here
    Values are checked against the schema the replicas published before anything is
    sent; then `set` waits until every replica answered this very change: applied (at
    which step, old -> new), rejected, overridden, or missed. A change stays in effect
    until the next change or `unset`, whatever the script writes: under a schedule, lr
    is the schedule times new/old (`--hold`: exactly the value); momentum, weight_decay
    and betas are held exactly. `lr` keeps the param groups' ratios. An optimizer that
    writes lr inside its own step cannot be steered: that answer is "overridden", and it
    comes after the step the change ran in. Independent replicas apply it at once; the
    ranks of a process group all at one step.
    """
    _change(
        broker, job, no_wait, as_json,
        lambda s: s.set(job, assignments, replicas, at_step, timeout, not no_wait, force, hold),
    )  # fmt: skip


def _change(broker: dict, job, no_wait: bool, as_json: bool, work) -> None:
    """Run one change (set, unset, pause, resume); exit with the code its answers mean."""
    results = _steer(_broker(**broker), work)
    sys.exit(_report(results, as_json, job, not no_wait))


@main.command("unset", epilog=EXIT_CODES)
@click.argument("names", nargs=-1, required=True, metavar="KEY...")
@click.option("--job", callback=_validate_job, help="Job id [default: the only running job].")
@click.option("--replica", "replicas", multiple=True, callback=_replica_list, metavar="r1,r2")
@click.option("--force", is_flag=True, help="Only some ranks of a process group, though.")
@click.option("--timeout", type=Seconds(min=0), default=30.0, show_default=True)
@click.option("--no-wait", is_flag=True, help="Write the change and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@broker_options
def unset_command(names, job, replicas, force, timeout, no_wait, as_json, **broker):
    """Give parameters back to the script.

    \b
      loomrun unset lr                       every replica's lr, as the script's schedule says
    An optimizer's value (lr, momentum, ...) is again what the script computes, from the
    step the unset lands at, unscaled; a declared parameter goes back to its default. The
    same checks and answers as `set`; `get` shows which parameters loomrun steers.
    """
    from loomrun.subjects import PARAM_NAME

    for name in names:
        if not PARAM_NAME.match(name):
            raise click.BadParameter(f"'{name}' is not a parameter name", param_hint="KEY")
    unique = list(dict.fromkeys(names))
    _change(
        broker, job, no_wait, as_json,
        lambda s: s.unset(job, unique, replicas, timeout, not no_wait, force),
    )  # fmt: skip


def _pause_or_resume(paused, job, replicas, at_step, force, timeout, no_wait, as_json, **broker):
    _change(
        broker, job, no_wait, as_json,
        lambda s: s.pause(job, paused, replicas, at_step, timeout, not no_wait, force),
    )  # fmt: skip


@main.command("pause", epilog=EXIT_CODES)
@steering_options
def pause_command(**kwargs):
    """Pause replicas between two steps (every replica by default; the ranks of a process
    group at one step they agree on)."""
    _pause_or_resume(True, **kwargs)


@main.command("resume", epilog=EXIT_CODES)
@steering_options
def resume_command(**kwargs):
    """Resume paused replicas."""
    _pause_or_resume(False, **kwargs)


@main.command("get")
@click.option("--job", callback=_validate_job, help="Job id [default: the only running job].")
@click.option("--replica", "replicas", multiple=True, callback=_replica_list, metavar="r1,r2")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@broker_options
def get_command(job, replicas, as_json, **broker):
    """List each replica's parameters: type, bounds, doc, current value, last change."""
    import json

    from loomrun import tables
    from loomrun.client import parameters
    from loomrun.params import format_value

    async def gather(steering):
        found = await steering.job(job)
        targets = steering.targets(found, replicas)
        statuses = await steering.statuses(found.job)
        outcomes = await steering.outcomes(found.job)
        return (
            found.job,
            [(r, await steering.schema(found.job, r)) for r in targets],
            statuses,
            outcomes,
        )

    name, schemas, statuses, outcomes = _steer(_broker(**broker), gather)
    listing = []
    for replica, specs in schemas:
        status = statuses[replica].status if replica in statuses else None
        listing += parameters(replica, specs, status, outcomes)
    if as_json:
        click.echo(json.dumps({"job": name, "params": listing}))
        return
    rows = [
        [
            p["replica"], p["name"],
            format_value(p["value"]) + ("  held" if p["held"] else ""),
            f"script: {format_value(p['own'])}" if p["steered"] else "", p["type"], p["bounds"],
            f"step {p['changed_at_step']}" if p["changed_at_step"] is not None else "",
            p["doc"],
        ]
        for p in listing
    ]  # fmt: skip
    tables.render(
        ["replica", "param", "value", "steered", "type", "bounds", "changed", "doc"],
        rows,
        title=name,
    )


@main.command("log")
@click.option("--job", callback=_validate_job, help="Job id [default: the only running job].")
@click.option("--replica", "replicas", multiple=True, callback=_replica_list, metavar="r1,r2")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per change, per line.")
@click.option("--follow", "-f", is_flag=True, help="Then print each new record as it comes.")
@click.option(
    "--metrics", is_flag=True,
    help="The metric history instead: per replica, a point per status (the script's metrics, "
    "lr, steps/s), at most 2048 evenly spread over the run.",
)  # fmt: skip
@broker_options
def log_command(job, replicas, as_json, follow, metrics, **broker):
    """The change ledger of a job, oldest first: when, who, replica, old -> new, the step
    it took effect at, its kind (set, hold, unset) and what became of it (applied,
    rejected, overridden, missed, superseded). A change that the script's optimizer wrote
    over after it was applied has a second record, "overridden", of the same change.

    Works for running and finished jobs: a finished job by its id, read from the job's
    `changes.jsonl` (`metrics.json` with --metrics; and the other nodes' `.nodeK` files) in
    the state directory when the broker no longer has it.
    """
    if metrics:
        _log_metrics(job, replicas, as_json, follow, _broker(**broker))
        return
    import json

    from loomrun.broker import state_dir
    from loomrun.client import Steering
    from loomrun.control.ledger import job_dir, read_files, record
    from loomrun.params import format_value
    from loomrun.printable import printable

    def show(item) -> None:
        with contextlib.suppress(
            KeyError, TypeError, ValueError, AttributeError, OverflowError, OSError
        ):
            shown(item)  # what is not a change record (a hand-edited file) is left out

    def shown(item: dict) -> None:
        if replicas and item["replica"] not in replicas:
            return
        if as_json:
            click.echo(json.dumps(item))
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item["time"]))
        change = f"{format_value(item['old'])} -> {format_value(item['new'])}"
        if item["name"] == "pause":
            change = "paused" if item["new"] else "resumed"
        kind = item.get("kind", "set")
        what = item["outcome"] + (f" ({kind})" if kind != "set" else "")
        what += f": {item['reason']}" if item["reason"] else ""
        click.echo(printable(
            f"{stamp}  {item['replica']}  {item['name']}  {change}  step {item['step']}  "
            f"{what}  ({item['who'] or '?'})"
        ))  # fmt: skip

    async def from_broker() -> tuple[str, int]:
        async with Steering.connect(_broker(**broker)) as steering:
            name = (await steering.job(job)).job if job is None else job
            count = 0
            async for outcome in steering.ledger(name, follow):
                show(record(name, outcome))
                count += 1
            return name, count

    name, count = _broker_first(job, from_broker, (job, 0))
    if count:
        return
    folder = job_dir(state_dir(), name)
    records = read_files(folder)
    if records is None:
        path = folder / "changes.jsonl"
        raise click.UsageError(f"no change ledger for job {name!r} (nor {path})")
    for item in records:
        show(item)


def _broker_first(job, read, fallback):
    """`loomrun log`: what `read()` got from the broker; `fallback` when the broker cannot
    answer for the job named, whose record is then read from disk. Without a job named, the
    broker's error is the answer."""
    import asyncio

    from loomrun.broker import BrokerError
    from loomrun.client import SteerError
    from loomrun.printable import printable

    try:
        return asyncio.run(read())
    except KeyboardInterrupt:
        sys.exit(0)
    except SteerError as error:
        if job is None:
            raise click.UsageError(printable(error)) from None
    except BrokerError as error:
        if job is None:
            click.echo(f"Error: {printable(error)}", err=True)
            sys.exit(EXIT_NO_BROKER)
    return fallback


def _log_metrics(job, replicas, as_json: bool, follow: bool, options) -> None:
    """`loomrun log --metrics`: the series from the supervisors, or the files they left."""
    import asyncio
    import json

    from loomrun._proto import loomrun_pb2 as pb
    from loomrun.broker import state_dir
    from loomrun.client import Steering
    from loomrun.control import history
    from loomrun.control.ledger import job_dir
    from loomrun.params import json_float
    from loomrun.printable import printable
    from loomrun.subjects import replica_order

    shown: dict[str, int] = {}  # replica -> last step printed
    header: list[str] = []

    def show(point: dict) -> None:
        shown[point["replica"]] = point["step"]
        if as_json:
            click.echo(json.dumps(point))
            return
        names = [n for n in point if n not in ("replica", "step", "time")]
        if not header or any(n not in header for n in names):
            header[:] = sorted(set(header) | set(names), key=lambda n: (n != "loss", n))
            click.echo(printable("replica  step        " + "  ".join(f"{n:>12}" for n in header)))
        values = [point.get(n, "") for n in header]
        cells = [f"{v:>12.4g}" if isinstance(v, float | int) else f"{v:>12}" for v in values]
        click.echo(printable(f"{point['replica']:<8} {point['step']:<11} " + "  ".join(cells)))

    def show_all(found: dict[str, dict[str, list]]) -> None:
        for replica in sorted(found, key=replica_order):
            if not replicas or replica in replicas:
                for point in history.points(replica, found[replica]):
                    show(point)

    async def from_broker() -> tuple[str, bool]:
        async with Steering.connect(options) as steering:
            found = await steering.job(job)
            series = await steering.history(found.job, found.replicas)
            show_all({r: history.series_dict(s) for r, s in series.items()})
            for replica in series:
                if not replicas or replica in replicas:
                    shown.setdefault(replica, -1)
            while follow and shown:
                for replica, status in (await steering.statuses(found.job)).items():
                    step = status.status.step
                    if replica in shown and step > shown[replica]:
                        values = {
                            k: json_float(v)
                            for k, v in history.status_values(status.status).items()
                        }
                        show({"replica": replica, "step": step, "time": status.status.time,
                              **values})  # fmt: skip
                    if status.state in (pb.EXITED, pb.FAILED, pb.STOPPED):
                        shown.pop(replica, None)
                await asyncio.sleep(0.5)
            return found.job, bool(series)

    name, answered = _broker_first(job, from_broker, (job, False))
    if answered:
        return
    folder = job_dir(state_dir(), name)
    found = history.read_files(folder)
    if not found:
        raise click.UsageError(
            f"no metric history for job {name!r} (its supervisors do not answer, and "
            f"{folder / 'metrics.json'} does not exist)"
        )
    show_all(found)


@main.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--all", "show_all", is_flag=True, help="Also jobs that ended over 10 minutes ago.")
@broker_options
def ls_command(as_json, show_all, **broker):
    """List the jobs on the broker: state, host, replicas, start time, script.

    Running jobs, and those that ended (or were lost) in the last 10 minutes.
    """
    import json
    import time

    from loomrun import tables

    async def gather(steering):
        try:
            return await steering.jobs()
        except Exception as error:  # noqa: BLE001 - an empty broker has no buckets yet
            if "no loomrun job" in str(error):
                return []
            raise

    jobs = _steer(_broker(**broker), gather)
    if not show_all:
        recent = time.time() - 600
        jobs = [j for j in jobs if max(max(n.heartbeat, n.finished) for n in j.nodes) > recent]
    listing = [
        {
            "job": j.job,
            "state": j.state,
            "hosts": sorted({n.host for n in j.nodes}),
            "replicas": j.replicas,
            "started": min(n.started for n in j.nodes),
            "script": j.nodes[0].script,
            "nodes": len(j.nodes),
        }
        for j in jobs
    ]
    if as_json:
        click.echo(json.dumps({"jobs": listing}))
        return
    if not listing:
        click.echo("no loomrun job on this broker")
        return
    rows = [
        [
            j["job"], j["state"], ",".join(j["hosts"]), str(len(j["replicas"])),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["started"])), j["script"],
        ]
        for j in listing
    ]  # fmt: skip
    tables.render(["job", "state", "host", "replicas", "started", "script"], rows)


@main.command("watch")
@click.option("--job", callback=_validate_job, help="Only this job [default: every job].")
@click.option("--replica", "replicas", multiple=True, callback=_replica_list, metavar="r1,r2")
@click.option("--once", is_flag=True, help="Print one snapshot and exit (1 if there is no job).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per snapshot.")
@click.option(
    "--interval",
    type=Seconds(min=0.1),
    default=None,
    help="Seconds between frames [default: 0.25 on a terminal, 2 otherwise].",
)
@click.option(
    "--metrics",
    default=None,
    metavar="a,b",
    help="Metric columns [default: loss and the most common others, 3 in all].",
)
@broker_options
def watch_command(job, replicas, once, as_json, interval, metrics, **broker):
    """Show every replica live: state, step, rate, metrics, lr, last change, GPU, restarts.

    A rich live table on a terminal; plain-text snapshots when piped. Closing it never
    affects the job.
    """
    import asyncio

    from loomrun.broker import BrokerError
    from loomrun.watch import run_watch

    chosen = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    options = _broker(**broker)
    try:
        code = asyncio.run(run_watch(options, job, replicas, once, as_json, interval, chosen))
    except KeyboardInterrupt:
        code = 0
    except BrokerError as error:
        click.echo(f"Error: {error}", err=True)
        code = EXIT_NO_BROKER
    sys.exit(code)


@main.command("server")
@click.option("--listen", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(1, 65535), default=4222, show_default=True)
@click.option(
    "--token",
    envvar="LOOMRUN_NATS_TOKEN",
    help="Require this token from clients [default: this user's secret, made on first use].",
)
@click.option(
    "--cluster",
    "cluster_listen",
    metavar="HOST:PORT",
    default=None,
    help="Be a member of a NATS cluster: listen for its routes here.",
)
@click.option(
    "--routes",
    default="",
    metavar="URL,URL",
    help="With --cluster: the other members' route URLs, e.g. nats://10.0.0.2:6222.",
)
@click.option(
    "--cluster-name", default="loomrun", show_default=True, help="With --cluster: its name."
)  # fmt: skip
def server_command(listen, port, token, cluster_listen, routes, cluster_name):
    """Run the bundled NATS broker (JetStream on) in the foreground, for a long-lived broker.

    It always requires a token: yours from your state directory unless --token (or
    LOOMRUN_NATS_TOKEN) gives another. Your own loomrun commands on this host connect
    without flags; anyone else needs the token.

    \b
    A cluster of three hosts, each member started with the other two as routes and the
    same token (members let in only routes that hold it):
      loomrun server --listen 0.0.0.0 --token $T --cluster 10.0.0.1:6222 \\
          --routes nats://10.0.0.2:6222,nats://10.0.0.3:6222
    Jobs and commands then connect with --nats nats://10.0.0.1:4222 and
    LOOMRUN_NATS_TOKEN=$T, keep three copies of their state with LOOMRUN_NATS_REPLICAS=3,
    and losing one member loses no change.
    """
    from loomrun.broker import (
        BrokerError,
        ClusterOptions,
        default_store,
        local_secret,
        private_state_dir,
        secret_path,
        server_binary,
        server_config,
        write_private,
    )

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cluster_name):
        raise click.BadParameter(
            f"{cluster_name!r} is not a cluster name (letters, digits, - and _)",
            param_hint="--cluster-name",
        )
    _check_listen(listen, port, "--listen/--port")
    if cluster_listen is not None:
        if not routes.strip():  # nats-server's JetStream refuses a cluster of one
            raise click.UsageError("--cluster needs --routes: the other members' route URLs")
        host, _, number = cluster_listen.rpartition(":")
        if not host or not number.isdigit() or not 1 <= int(number) <= 65535:
            raise click.BadParameter(
                f"{cluster_listen!r} is not HOST:PORT (like 0.0.0.0:6222)", param_hint="--cluster"
            )
        _check_listen(host.strip("[]"), int(number), "--cluster")
    try:
        binary = server_binary()
        state = private_state_dir()
        secret = token or local_secret()
        store = default_store(port)
        store.mkdir(parents=True, exist_ok=True, mode=0o700)
        config = state / f"nats-server-{port}.conf"
        cluster = None
        if cluster_listen is not None:
            listed = tuple(r.strip() for r in routes.split(",") if r.strip())
            for route in listed:
                if not re.fullmatch(r"nats(-route)?://[^\s/]+:\d{1,5}", route):
                    raise click.BadParameter(
                        f"{route!r} is not a route URL (like nats://10.0.0.2:6222)",
                        param_hint="--routes",
                    )
            cluster = ClusterOptions(cluster_name, cluster_listen, listed)
        elif routes:
            raise click.UsageError("--routes goes with --cluster HOST:PORT")
        write_private(config, server_config(listen, port, store, secret, None, cluster))
    except (BrokerError, OSError) as error:
        raise click.ClickException(str(error)) from None
    url = f"nats://{listen}:{port}"
    click.echo(f"loomrun: NATS broker on {url}, store {store}", err=True)
    if token:
        click.echo("loomrun: clients connect with LOOMRUN_NATS_TOKEN set to that token", err=True)
    else:
        click.echo(
            f"loomrun: your loomrun commands here connect as they are; elsewhere, "
            f"LOOMRUN_NATS={url} LOOMRUN_NATS_TOKEN=$(cat {secret_path()})",
            err=True,
        )
    os.execv(str(binary), [str(binary), "-c", str(config)])


def _check_listen(host: str, port: int, option: str) -> None:
    """The server can listen there: said in one line before it starts, not as the last of
    the broker's own log lines after loomrun said it runs."""
    import socket

    host = host.strip("[]")  # "[::]": every IPv6 address, as nats-server takes it
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:  # "::" is every address, IPv4 ones too, as nats-server binds it
        socket.create_server((host, port), family=family, dualstack_ipv6=host == "::").close()
    except (OSError, UnicodeError) as error:
        reason = (getattr(error, "strerror", None) or str(error)).split(" (while")[0]
        raise click.BadParameter(
            f"cannot listen on {host}:{port}: {reason}", param_hint=option
        ) from None


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


@main.command("ui")
@click.option("--job", callback=_validate_job, help="Show this job first [default: the newest].")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=0, show_default=True,
    help="Port on 127.0.0.1 [default 0: any free one].",
)  # fmt: skip
@broker_options
def ui_command(job, port, **broker):
    """Serve a web page of the jobs on 127.0.0.1: replicas, curves with a marker at each
    change, devices, events, and controls with every replica's answer.

    It prints the page's URL with a random token (like Jupyter's); only who holds it gets
    in. It uses the broker's credentials of the user who starts it; every control goes
    through the same checks and answers as `loomrun set`. Ctrl-C stops it; the jobs go on.
    """
    import asyncio

    from loomrun.broker import BrokerError
    from loomrun.ui.server import ListenError, serve

    def ready(url: str) -> None:
        click.echo(f"loomrun ui: {url}", err=False)
        click.echo("Open it in a browser on this machine (or through an SSH tunnel); Ctrl-C stops.")
        sys.stdout.flush()

    try:
        asyncio.run(serve(_broker(**broker), job, port, ready))
    except KeyboardInterrupt:
        return
    except BrokerError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(EXIT_NO_BROKER)
    except ListenError as error:
        raise click.BadParameter(str(error), param_hint="--port") from None


def command_line() -> None:
    """The `loomrun` console script: `main`, then out without Python's own teardown.

    Every command closes what it opened before it returns; what Python's shutdown would
    still do is free each loaded module, one by one (20-40 ms after a launch or a `set`,
    nearly a third of a `set`). Flushed output and the exit code are all that is left."""
    try:
        main()  # standalone mode: click ends every command with SystemExit
    except SystemExit as done:
        code = done.code
    except Exception as error:
        from nats.errors import Error as NatsError  # loaded already, if it raised this

        if not isinstance(error, NatsError):
            raise
        from loomrun.printable import printable

        said = printable(str(error) or type(error).__name__)
        print(f"Error: the NATS broker stopped answering ({said})", file=sys.stderr)
        code = EXIT_NO_BROKER
    else:
        code = 0
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what Python itself does with sys.exit("message")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    command_line()
