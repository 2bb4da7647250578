"""What to launch: `loomrun run`'s options checked together into a LaunchSpec, each
worker's torchrun environment, and what a worker's exit code means.

The CLI makes the spec (`RunOptions.spec`); the supervisor runs it. Nothing here imports
click or starts a process. Beside it in this package, what the supervisor launches with:
processes.py (spawn, signal, stop, reap; the console), health.py (hung or moving) and
jobdirs.py (the job's folders and its job-id lock)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import secrets
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loomrun.broker.connect import BrokerOptions


class LaunchError(ValueError):
    """An option, or options together, that cannot make a job: `option` names the one
    (None when it is their combination)."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class LaunchSpec:
    """Everything `loomrun run` was asked to do, already validated."""

    job: str
    script: str | None = None
    module: str | None = None
    args: tuple[str, ...] = ()
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "localhost"
    master_port: int | None = None
    max_restarts: int = 0
    restart_policy: str = "group"
    log_dir: Path | None = None
    console_filter: frozenset[str] | None = None
    grace: float = 30.0
    step_timeout: float | None = None
    # Replica name -> its recorded changes to apply at their steps (loomrun.replay).
    replay: dict[str, list] | None = None
    # A snapshot every N steps (0: none), the last K kept (runtime.snapshots).
    snapshot_every: int = 0
    snapshot_keep: int = 2
    save_dir: Path | None = None  # where SIGUSR1 saves [default: the job's folder]
    rules: tuple = ()  # a --rules file's (pb.Rule), run by the control plane (control.rules)
    broker: BrokerOptions | None = field(default_factory=BrokerOptions)
    wait_broker: bool = False

    @property
    def target_name(self) -> str:
        return f"-m {self.module}" if self.module else str(self.script)

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def rank_of(self, local_rank: int) -> int:
        return self.node_rank * self.nproc + local_rank

    def replica_names(self) -> list[str]:
        """Global names: node 1 of 2 with 4 per node has r4..r7."""
        return [f"r{self.rank_of(i)}" for i in range(self.nproc)]

    def notices(self) -> list[str]:
        """What the supervisor says as the job starts."""
        names = self.replica_names()
        shown = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
        steer = f", steer it with `loomrun set --job {self.job} ...`" if self.broker else ""
        lines = [f"job {self.job}: {len(names)} replica(s) {shown}{steer}"]
        if self.nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
            lines.append(
                "setting OMP_NUM_THREADS=1 for each worker to avoid overloading the machine; "
                "set it yourself to tune it"
            )
        return lines

    def worker_command(self) -> list[str]:
        target = ["-m", self.module] if self.module else [self.script]
        return [sys.executable, "-m", "loomrun.runtime.boot", *target, *self.args]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_env(
    spec: LaunchSpec,
    local_rank: int,
    master_port: int,
    restart_count: int,
    error_file: Path,
    base: dict[str, str],
) -> dict[str, str]:
    """torchrun's worker environment for one replica, plus loomrun's own variables."""
    rank = spec.rank_of(local_rank)
    env = dict(base)
    env.pop("LOOMRUN_NATS_TOKEN", None)  # the broker's secret is the supervisor's, not the script's
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(spec.world_size),
        LOCAL_WORLD_SIZE=str(spec.nproc),
        GROUP_RANK=str(spec.node_rank),
        GROUP_WORLD_SIZE=str(spec.nnodes),
        ROLE_RANK=str(rank),
        ROLE_NAME="default",
        ROLE_WORLD_SIZE=str(spec.world_size),
        MASTER_ADDR=spec.master_addr,
        MASTER_PORT=str(master_port),
        TORCHELASTIC_RUN_ID=spec.job,
        TORCHELASTIC_RESTART_COUNT=str(restart_count),
        TORCHELASTIC_MAX_RESTARTS=str(spec.max_restarts),
        TORCHELASTIC_ERROR_FILE=str(error_file),
        TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT",
        LOOMRUN_JOB=spec.job,
        LOOMRUN_REPLICA=f"r{rank}",
    )
    if spec.snapshot_every:
        env["LOOMRUN_SNAPSHOT_EVERY"] = str(spec.snapshot_every)
        env["LOOMRUN_SNAPSHOT_KEEP"] = str(spec.snapshot_keep)
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # Output goes through a pipe to the supervisor; unbuffered keeps it live and in order.
    env.setdefault("PYTHONUNBUFFERED", "1")
    if spec.nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def exit_code_of(returncode: int) -> int:
    """A shell's view of a child's status: 128+n for death by signal n."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name} (exit code {exit_code_of(returncode)})"
    return f"exit code {returncode}"


@dataclass(frozen=True)
class RunOptions:
    """`loomrun run`'s options as the command line gave them; `spec` checks them together.

    A LaunchError names the option that is wrong; the CLI shows it as a usage error."""

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
    snapshot_every: int
    snapshot_keep: int | None
    save_dir: Path | None
    rules: Path | None
    broker: BrokerOptions | None  # None: --no-broker
    wait_broker: bool

    def spec(self, target: tuple[str, ...], raw_args: list[str], agreed=None, say=None):
        """The validated LaunchSpec. With --rdzv-backend c10d, `agreed` is the rendezvous'
        (node rank, master address, master port); without it the options are checked
        against every node's replicas. `say` takes the notices a user should read."""
        script, args = self._target(target, raw_args)
        nproc = proc_count(self.replicas)
        if self.snapshot_keep is not None and not self.snapshot_every:
            raise LaunchError("goes with --snapshot-every N", "--snapshot-keep")
        if self.standalone and self.nnodes > 1:
            raise LaunchError("--standalone is for one node, but --nnodes is more than 1")
        node_rank = self.node_rank or 0
        if node_rank >= self.nnodes:
            raise LaunchError(
                f"{node_rank} is out of range (expected 0..{self.nnodes - 1} with "
                f"--nnodes {self.nnodes})",
                "--node-rank",
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
        before_rendezvous = self.rdzv_backend == "c10d" and agreed is None  # said once, after
        elsewhere = [f"r{i}" for i in range(self.nnodes * nproc) if f"r{i}" not in names]
        job = (
            self.job or self.rdzv_id or default_job_id(script, self.module, self.nnodes, rendezvous)
        )
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
            replay=self._replay(names, None if before_rendezvous else say),
            snapshot_every=self.snapshot_every,
            snapshot_keep=self.snapshot_keep or 2,
            save_dir=self.save_dir.absolute() if self.save_dir else None,
            rules=self._rules(),
            broker=self.broker,
            wait_broker=self.wait_broker,
        )

    def _rules(self) -> tuple:
        """The --rules file's rules, each parsed (never evaluated)."""
        if self.rules is None:
            return ()
        if self.broker is None:
            raise LaunchError(
                "rules are run by the control plane: leave out --no-broker", "--rules"
            )
        if self.nnodes > 1:
            raise LaunchError("rules run on a job of one node (of one supervisor)", "--rules")
        from loomrun.rulebook import read_rules_file
        from loomrun.rulelang import RuleError

        try:
            return tuple(read_rules_file(self.rules))
        except RuleError as error:
            raise LaunchError(str(error), "--rules") from None

    def _check_rendezvous(self) -> None:
        from loomrun import rendezvous

        if self.node_rank is not None:
            raise LaunchError(
                "--node-rank is agreed with --rdzv-backend c10d: leave it out (or use "
                "--rdzv-backend static)"
            )
        if not self.rdzv_endpoint or not self.rdzv_id:
            raise LaunchError("--rdzv-backend c10d needs --rdzv-endpoint HOST[:PORT] and "
                                   "--rdzv-id, the same on every node")  # fmt: skip
        if self.master_addr or self.master_port:
            raise LaunchError("the master is agreed with --rdzv-backend c10d: leave out "
                                   "--master-addr and --master-port")  # fmt: skip
        try:
            rendezvous.endpoint(self.rdzv_endpoint)
        except rendezvous.RendezvousError as error:
            raise LaunchError(str(error), "--rdzv-endpoint") from None

    def agree(self, say) -> tuple[int, str, int]:
        """--rdzv-backend c10d: this node's rank and the master, agreed with the others.
        A rendezvous that fails raises RendezvousError."""
        from loomrun import rendezvous

        if self.nnodes == 1:
            return 0, "localhost", 0
        say(f"loomrun: waiting for {self.nnodes} nodes at {self.rdzv_endpoint}")
        nproc = proc_count(self.replicas)
        found = rendezvous.agree(self.rdzv_endpoint, self.nnodes, nproc, self.rdzv_id)
        say(
            f"loomrun: node rank {found.node_rank} of {self.nnodes}, master "
            f"{found.master_addr}:{found.master_port}"
        )
        return found.node_rank, found.master_addr, found.master_port

    def _replay(self, names: list[str], say) -> dict[str, list] | None:
        """The recorded changes for these replicas; `say` (None: quiet) hears the count."""
        if self.replay is None:
            return None
        from loomrun.replay import ReplayError, load, schedules

        try:
            plans, missing = schedules(load(self.replay), names)
        except ReplayError as error:
            raise LaunchError(str(error), "--replay") from None
        if say is not None:
            count = sum(len(plan) for plan in plans.values())
            say(f"loomrun: replaying {count} change(s) from {self.replay}")
            if missing:
                say(
                    f"loomrun: the record has changes for {', '.join(missing)}, which this "
                    "job does not have: skipped"
                )
        return plans

    def _target(self, target: tuple[str, ...], raw_args: list[str]):
        """The script (None for -m) and the arguments that go to it."""
        module, args = self.module, list(target)
        if module is not None:
            if not module or module.startswith("-") or module.endswith(".py") or "/" in module:
                raise LaunchError(
                    f"'{module}' is not a module name (expected a dotted name like pkg.train)",
                    "-m",
                )
            if args and not _module_precedes_script(raw_args, args[0]):
                raise LaunchError(
                    f"got both a script ('{args[0]}') and -m {module}: give one of them"
                )
            check_module(module)
            return None, args
        if not args:
            raise LaunchError("missing SCRIPT (or -m MODULE) to run")
        script = args.pop(0)
        if script.startswith("-"):
            raise LaunchError(f"no such option: {script}")
        if not Path(script).is_file():
            raise LaunchError(f"'{script}' does not exist or is not a file", "SCRIPT")
        return script, args


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
            raise LaunchError(
                f"'{item}' is not a replica of this node (expected one of {', '.join(names)} "
                f"or a local rank 0..{len(names) - 1})",
                "--replicas-filter",
            )
    return frozenset(chosen)


def _module_precedes_script(raw: list[str], script: str) -> bool:
    """True when the script stood after `-m MODULE`, i.e. it is an argument of the module."""
    positions = [
        i for i, a in enumerate(raw) if a in ("-m", "--module") or a.startswith("--module=")
    ]
    return bool(positions) and script in raw[positions[0] :]


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
        raise LaunchError("gpu: NVML sees no GPU on this node", "--nproc-per-node")
    return gpus or cpus or 1


def check_module(module: str) -> None:
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
        raise LaunchError(f"no module named '{top}'", "-m")
