"""Spawns the workers and owns their lifetime: environment, signals, restarts, failures.

The supervisor never imports torch: starting it costs a Python start-up, not a torch import.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from loomrun.broker.bundled import sweep_orphan_brokers
from loomrun.launch import LaunchSpec, describe_exit, exit_code_of, free_port, worker_env
from loomrun.lifeline import parent_env
from loomrun.mailbox import Mailbox, MailboxError, new_segment_path, sweep_stale
from loomrun.output import ConsoleStream, ReplicaOutput, prefix_for, say, use_color
from loomrun.printable import printable
from loomrun.watchdog import Watchdog

HANG_AFTER = 60.0
PROGRESS_CHECK = 0.5
EXIT_STOPPED_BY = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
# A closed terminal or a dropped ssh session (SIGHUP) stops the job like SIGTERM does.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Replica:
    """One worker slot: its identity stays, its process changes across restarts."""

    name: str
    local_rank: int
    restarts: int = 0
    proc: asyncio.subprocess.Process | None = None
    pgid: int | None = None
    started: float = 0.0
    output: ReplicaOutput | None = None
    pumps: list[asyncio.Task] = field(default_factory=list)
    error_file: Path | None = None
    finished: bool = False
    failure_note: str = ""
    progress: Progress = field(default_factory=lambda: Progress())


def hang_after() -> float:
    """Seconds without a step or a status before a replica shows as hung (at least; ten
    of its usual steps if longer): LOOMRUN_HANG_AFTER, default 60."""
    try:
        return max(0.1, float(os.environ.get("LOOMRUN_HANG_AFTER", HANG_AFTER)))
    except ValueError:
        return HANG_AFTER


@dataclass
class Progress:
    """Whether a worker still moves, read off its mailbox: the step counter it bumps at each
    step, and its status, which it writes even while paused."""

    since: float = field(default_factory=time.monotonic)
    step: int = 0
    status: int = 0
    step_time: float = 0.0  # seconds per step, smoothed
    hung: bool = False

    def quiet_for(self, step: int, status: int, now: float) -> float:
        """Seconds since the step or the status last moved (or since the start)."""
        if step != self.step:
            if self.step:
                per_step = (now - self.since) / max(1, step - self.step)
                self.step_time = (
                    per_step if not self.step_time else 0.8 * self.step_time + 0.2 * per_step
                )
            self.step, self.status, self.since = step, status, now
            return 0.0
        if status != self.status:
            self.status, self.since = status, now
            return 0.0
        return now - self.since


class Supervisor:
    """Runs one node's replicas until they finish, fail past their restarts, or are stopped."""

    def __init__(self, spec: LaunchSpec):
        self.spec = spec
        color_out, color_err = use_color(sys.stdout), use_color(sys.stderr)
        self._console_out = ConsoleStream(sys.stdout.buffer)
        self._console_err = ConsoleStream(sys.stderr.buffer)
        self._console_err.speak_here()
        self._color = color_out and color_err
        self.replicas = [Replica(name, i) for i, name in enumerate(spec.replica_names())]
        self.restarts_of_all = 0
        self.master_port = spec.master_port or free_port()
        self._stop_signal: signal.Signals | None = None
        self._stop_requested = asyncio.Event()
        self._run_dir: Path | None = None
        self._own_run_dir = False
        self.mailboxes: dict[str, Mailbox] = {}
        self.control = None
        self.watchdog: Watchdog | None = None
        self._remote_failures: asyncio.Queue = asyncio.Queue()  # other nodes' GroupFailures

    # -- the main loop ---------------------------------------------------------

    async def run(self) -> int:
        """The job, from the claim of its id to the last replica's end. The console is
        written out on every way out: a refusal's one line once left with os._exit unsaid."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            return await self._run()
        finally:
            self._console_out.close()
            self._console_err.close()
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        self.started = time.time()  # this run's, for what is on disk and on the broker
        self.watchdog = Watchdog()
        self.record_dirs = self._record_dirs()
        running = self._claim_job_id()
        if running:
            say(running)
            self.watchdog.close()
            return 2
        self._prepare_run_dir()
        from loomrun.control.ledger import set_aside_earlier

        for folder in self.record_dirs:  # with or without a broker: no earlier run's records
            set_aside_earlier(folder, self.started, self.spec.node_rank, self.spec.nnodes)
        names = [r.name for r in self.replicas]
        shown = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
        control = (
            f", steer it with `loomrun set --job {self.spec.job} ...`" if self.spec.broker else ""
        )
        say(f"job {self.spec.job}: {len(names)} replica(s) {shown}{control}")
        if self.spec.nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
            say(
                "setting OMP_NUM_THREADS=1 for each worker to avoid overloading the machine; "
                "set it yourself to tune it"
            )
        code = 1
        try:
            self._open_mailboxes()
            for replica in self.replicas:
                await self._start(replica)
            self.watchdog.start()  # after the spawns too: a Python start-up of its own
            await self._start_control()  # after the spawns: importing nats alone takes 0.3 s
            progress = asyncio.ensure_future(self._watch_progress())
            try:
                code = await self._watch()
            finally:
                progress.cancel()
            return code
        except MailboxError as error:
            say(str(error))
            return 1
        finally:
            await self._stop([r for r in self.replicas if self._alive(r)], signal.SIGTERM)
            for replica in self.replicas:
                self._reaped(replica)
                await self._drain(replica)
            if self.control is not None:
                await self.control.close(code)
            for mailbox in self.mailboxes.values():
                mailbox.unlink()
            self._release_run_dir()
            self.watchdog.close()

    async def _watch(self) -> int:
        waits = {asyncio.ensure_future(self._wait(r)): r for r in self.replicas}
        stop = asyncio.ensure_future(self._stop_requested.wait())
        remote = asyncio.ensure_future(self._remote_failures.get())
        try:
            while waits:
                done, _ = await asyncio.wait(
                    [*waits, stop, remote], return_when=asyncio.FIRST_COMPLETED
                )
                if stop in done:
                    return await self._stop_on_signal()
                if remote in done:
                    word, remote = (
                        remote.result(),
                        asyncio.ensure_future(self._remote_failures.get()),
                    )
                    restarted = await self._follow(word)
                    if restarted is None:
                        return min(max(word.exit_code, 1), 255)
                    for r in restarted:
                        for t in [t for t, x in waits.items() if x is r]:
                            t.cancel()
                            del waits[t]
                        waits[asyncio.ensure_future(self._wait(r))] = r
                    continue
                for task in done:
                    replica = waits.pop(task, None)
                    if replica is None:  # its process was replaced by a group restart
                        continue
                    returncode = task.result()
                    self._reaped(replica)
                    if returncode == 0 and replica.failure_note:
                        returncode = -signal.SIGTERM  # stopped as a failure, though it said 0
                    if returncode == 0:
                        replica.finished = True
                        self._tell_exit(replica, 0, "exited with code 0")
                        continue
                    restarted = await self._restart_after_failure(replica, returncode)
                    if not restarted:
                        return exit_code_of(returncode)
                    for r in restarted:
                        for t in [t for t, x in waits.items() if x is r]:
                            t.cancel()
                            del waits[t]
                        waits[asyncio.ensure_future(self._wait(r))] = r
            return 0
        finally:
            stop.cancel()
            remote.cancel()
            for task in waits:
                task.cancel()

    async def _wait(self, replica: Replica) -> int:
        return await replica.proc.wait()

    # -- failures and restarts ---------------------------------------------------

    async def _restart_after_failure(self, replica: Replica, returncode: int) -> list[Replica]:
        """Restart per the policy and return who was restarted; [] when out of restarts."""
        await self._drain(replica)
        spec = self.spec
        per_replica = spec.restart_policy == "replica"
        used = replica.restarts if per_replica else self.restarts_of_all
        exited = f"{replica.name} {describe_exit(returncode)}"
        if replica.failure_note:
            exited += f" ({replica.failure_note})"
            replica.failure_note = ""
        if used >= spec.max_restarts:
            self._tell_exit(replica, exit_code_of(returncode), exited)
            self._tell_nodes(used, True, exited, exit_code_of(returncode))
            await self._fail(replica, returncode)
            return []
        why = f"(restart {used + 1}/{spec.max_restarts}): {exited}"
        self._tell_exit(replica, exit_code_of(returncode), exited, restarting=True)
        if per_replica:
            replica.restarts += 1
            say(f"restarting {replica.name} {why}")
            self._prepare_restart(replica)
            await self._start(replica)
            return [replica]
        self._tell_nodes(used + 1, False, exited, exit_code_of(returncode))
        return await self._restart_all(why)

    def _tell_nodes(
        self, attempt: int, give_up: bool, reason: str, code: int, stopped: bool = False
    ) -> None:
        """On several nodes, the others restart (or stop) with this one: their ranks would
        otherwise wait on the failed ones until a collective times out."""
        if self.control is not None and self.spec.nnodes > 1:
            self.control.node_failed(attempt, give_up, reason, code, stopped)

    async def _follow(self, word) -> list[Replica] | None:
        """Another node's group failed: restart this node's replicas as its restart
        `attempt` (once: a node that failed too counts the same attempt), or stop them
        when it gave up (None)."""
        if self.spec.restart_policy != "group":
            return []
        why = f"node {word.node_rank}: {printable(word.reason)}"
        if word.give_up or word.attempt > self.spec.max_restarts:
            alive = [r for r in self.replicas if self._alive(r)]
            past = "" if word.stopped else ", past its restarts"
            say(f"{why}{past}; stopping this node's replicas")
            await self._stop(alive, signal.SIGTERM)
            return None
        if word.attempt <= self.restarts_of_all:
            return []  # this node is at that restart already
        self.restarts_of_all = word.attempt - 1
        for replica in self.replicas:
            if self._alive(replica):
                self._tell_exit(replica, 0, f"stopped to restart with {why}", restarting=True)
        return await self._restart_all(f"(restart {word.attempt}/{self.spec.max_restarts}): {why}")

    async def _restart_all(self, why: str) -> list[Replica]:
        self.restarts_of_all += 1
        say(f"restarting all replicas {why}")
        await self._stop([r for r in self.replicas if self._alive(r)], signal.SIGTERM)
        for r in self.replicas:
            await self._drain(r)
            r.restarts = self.restarts_of_all
            r.finished = False
            r.failure_note = ""  # of the worker stopped here, not of the next one
        for r in self.replicas:  # every mailbox ready before any worker starts: one baseline
            self._prepare_restart(r)
        for r in self.replicas:
            await self._start(r)
        return list(self.replicas)

    def _prepare_restart(self, replica: Replica) -> None:
        """A clean mailbox for the next worker (the last may have died mid-write), holding
        the desired state to start from: no step number of the last incarnation carries
        over (see DesiredConfig.rebase; without a broker nothing was steered, and what the
        mailbox holds applies at once)."""
        if self.control is not None:
            self.control.replica_restarting(replica.name)
            return
        mailbox = self.mailboxes[replica.name]
        mailbox.reset_worker_side()
        try:
            _, state = mailbox.desired.read()
        except MailboxError:
            state = None
        if state is not None:
            from loomrun.desired import DesiredConfig  # protobuf: not before the first spawn

            desired = DesiredConfig()
            desired.state.CopyFrom(state)
            desired.rebase()
            mailbox.desired.write(desired.state)

    async def _fail(self, replica: Replica, returncode: int) -> None:
        runtime = time.monotonic() - replica.started
        others = [r for r in self.replicas if r is not replica and self._alive(r)]
        tail = "; stopping the other replicas" if others else ""
        say(
            f"replica {replica.name} failed: {describe_exit(returncode)} "
            f"(pid {replica.proc.pid}, after {runtime:.1f}s){tail}"
        )
        detail = self._error_detail(replica)
        if detail:
            say(f"last lines of {replica.name}'s error:")
            for line in detail:
                say(f"  {line}")
        await self._stop(others, signal.SIGTERM)

    def _error_detail(self, replica: Replica) -> list[str]:
        """The traceback torch's @record left, or else the end of the replica's stderr."""
        try:
            record = json.loads(replica.error_file.read_text())
            message = record.get("message", {})
            if isinstance(message, dict):
                text = message.get("extraInfo", {}).get("py_callstack") or message.get("message")
            else:
                text = str(message)
            if text:
                return str(text).rstrip().splitlines()[-20:]
        except (OSError, ValueError, AttributeError, TypeError):
            pass
        return list(replica.output.tail)[-20:] if replica.output else []

    # -- signals -------------------------------------------------------------------

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop_signal is not None:
            say(f"second {sig.name}: killing every worker now")
            for replica in self.replicas:
                self._signal_pgid(replica, signal.SIGKILL)
            return
        self._stop_signal = sig
        self._stop_requested.set()

    async def _stop_on_signal(self) -> int:
        sig = self._stop_signal
        code = EXIT_STOPPED_BY.get(sig, 128 + int(sig))
        self._tell_nodes(self.restarts_of_all, True, f"stopped by {sig.name}", code, stopped=True)
        passed = signal.SIGTERM if sig == signal.SIGHUP else sig  # scripts handle SIGTERM
        alive = [r for r in self.replicas if self._alive(r)]
        if alive:
            say(
                f"got {sig.name}: passing {passed.name} to {len(alive)} worker(s), "
                f"SIGKILL after {self.spec.grace:g}s (again to kill now)"
            )
        await self._stop(alive, passed)
        return code

    # -- processes -----------------------------------------------------------------

    async def _start(self, replica: Replica) -> None:
        spec = self.spec
        attempt_dir = self._run_dir / f"attempt_{replica.restarts}" / replica.name
        attempt_dir.mkdir(parents=True, exist_ok=True)
        replica.error_file = attempt_dir / "error.json"
        replica.error_file.unlink(missing_ok=True)
        show = spec.console_filter is None or replica.name in spec.console_filter
        replica.output = ReplicaOutput(
            prefix_for(replica.name, replica.local_rank, self._color),
            show,
            self._console_out,
            self._console_err,
            attempt_dir if spec.log_dir else None,
        )
        env = worker_env(
            spec,
            replica.local_rank,
            self.master_port,
            replica.restarts,
            replica.error_file,
            dict(os.environ),
        )
        env["LOOMRUN_MAILBOX"] = str(self.mailboxes[replica.name].path)
        env.update(parent_env())  # the worker's boot asks to be killed when this process dies
        if spec.replay and spec.replay.get(replica.name):
            plan = self._run_dir / f"replay-{replica.name}.json"
            plan.write_text(json.dumps(spec.replay[replica.name]))
            env["LOOMRUN_REPLAY"] = str(plan)
        replica.proc = await asyncio.create_subprocess_exec(
            *spec.worker_command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
            limit=1 << 20,
        )
        replica.pgid = replica.proc.pid
        replica.progress = Progress()
        self.watchdog.tell(f"group {replica.pgid}")
        replica.started = time.monotonic()
        if self.control is not None:
            self.control.replica_started(replica.name, replica.proc.pid, replica.restarts)
        replica.pumps = [
            asyncio.ensure_future(replica.output.pump(replica.proc.stdout, "stdout")),
            asyncio.ensure_future(replica.output.pump(replica.proc.stderr, "stderr")),
        ]

    @staticmethod
    def _alive(replica: Replica) -> bool:
        return replica.proc is not None and replica.proc.returncode is None

    @staticmethod
    def _signal_pgid(replica: Replica, sig: int) -> None:
        if replica.pgid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(replica.pgid, sig)

    async def _stop(self, replicas: list[Replica], sig: int) -> None:
        """`sig` to each replica's whole process group, the grace period, then SIGKILL."""
        if not replicas:
            return
        for replica in replicas:
            self._signal_pgid(replica, sig)
        waits = [asyncio.ensure_future(r.proc.wait()) for r in replicas]
        _, pending = await asyncio.wait(waits, timeout=self.spec.grace)
        if pending:
            late = [r.name for r in replicas if self._alive(r)]
            say(f"{', '.join(late)} still running after {self.spec.grace:g}s: sending SIGKILL")
            for replica in replicas:
                self._signal_pgid(replica, signal.SIGKILL)
            await asyncio.wait(pending)
        for replica in replicas:
            self._reaped(replica)

    def _reaped(self, replica: Replica) -> None:
        """Its worker is gone: what it left in its process group (dataloader workers, a
        shell, a helper) goes too, right away, while the group id is still held by them or
        just freed; then the group is forgotten, so no signal ever reaches a group that is
        no longer ours (ids are reused)."""
        if replica.pgid is None or self._alive(replica):
            return
        self._signal_pgid(replica, signal.SIGKILL)
        self.watchdog.tell(f"forget {replica.pgid}")
        replica.pgid = None

    async def _drain(self, replica: Replica) -> None:
        """Let the log pumps reach EOF, but not wait on a grandchild holding the pipe open."""
        if replica.pumps:
            _, pending = await asyncio.wait(replica.pumps, timeout=1.0)
            for task in pending:
                task.cancel()
            replica.pumps = []
        if replica.output is not None:
            replica.output.close()

    async def _start_control(self) -> None:
        """The NATS side: it connects while the workers start up, never ahead of them."""
        if self.spec.broker is None:
            return
        from loomrun.control.plane import ControlPlane, ReplicaView

        views = [ReplicaView(r.name, r.local_rank, self.mailboxes[r.name]) for r in self.replicas]
        self.control = ControlPlane(
            job=self.spec.job,
            node_rank=self.spec.node_rank,
            nnodes=self.spec.nnodes,
            script=" ".join([self.spec.target_name, *self.spec.args]),
            replicas=views,
            options=self.spec.broker,
            on_device_failure=self.fail_device,
            wait_broker=self.spec.wait_broker,
            on_local_broker=lambda port: self.watchdog.tell(f"broker {port}"),
            ledger_dirs=self.record_dirs,
            started=self.started,
        )
        self.control.on_node_failure = self._remote_failures.put_nowait
        for replica in self.replicas:
            if replica.proc is not None:
                self.control.replica_started(replica.name, replica.proc.pid, replica.restarts)
        await self.control.start()

    def _record_dirs(self) -> list[Path]:
        """Where the change ledger and the metric history are kept on disk: the job's folder
        in the state directory (`loomrun log` finds them there when the broker no longer
        has them), and --log-dir."""
        from loomrun.broker import BrokerError
        from loomrun.broker.state import private_state_dir
        from loomrun.control.ledger import job_dir

        try:
            folders = [job_dir(private_state_dir(), self.spec.job)]
        except BrokerError as error:
            say(f"{error}; the change ledger is kept in the broker only")
            folders = []
        if self.spec.log_dir is not None:
            folders.append(Path(self.spec.log_dir) / self.spec.job)
        return folders

    def _claim_job_id(self) -> str:
        """This job id (and node rank) is this supervisor's on this host while it runs: a
        lock in the job's folder of the state directory, held until it ends. Another run
        of the same id started meanwhile would set its records aside and purge its state
        on the broker: it is refused instead, with the line returned."""
        if not self.record_dirs:
            return ""
        import fcntl

        name = f".supervisor.node{self.spec.node_rank}.lock"
        path = self.record_dirs[0] / name
        try:
            self.record_dirs[0].mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return ""  # no folder of its own: nothing of an earlier run's there to protect
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            node = f" (node {self.spec.node_rank})" if self.spec.nnodes > 1 else ""
            return (
                f"job {self.spec.job}{node} is already running on this host (supervisor pid "
                f"{holder or '?'}): give this one another --job"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._job_lock = fd  # closed with the process: the lock goes with it
        return ""

    def _tell_exit(self, replica: Replica, code: int, text: str, restarting: bool = False) -> None:
        if self.control is not None:
            self.control.replica_exited(replica.name, code, text, restarting)

    def fail_device(self, name: str, note: str) -> None:
        """A health checker says this replica's device failed: stop it; the policy decides."""
        for replica in self.replicas:
            if replica.name == name and self._alive(replica):
                self._terminate(replica, note)

    def _terminate(self, replica: Replica, note: str) -> None:
        """Stop one replica as a failure (the restart policy decides what follows): SIGTERM,
        and SIGKILL after the grace period if that very process still runs."""
        say(f"{replica.name}: {note}; stopping it")
        replica.failure_note = note
        self._signal_pgid(replica, signal.SIGTERM)
        proc = replica.proc

        async def kill_later() -> None:
            await asyncio.sleep(self.spec.grace)
            if replica.proc is proc and self._alive(replica):
                self._signal_pgid(replica, signal.SIGKILL)

        asyncio.ensure_future(kill_later())

    async def _watch_progress(self) -> None:
        """Replicas that neither step nor write a status: shown as hung, and with
        --step-timeout stopped and restarted per the policy."""
        timeout = self.spec.step_timeout
        while True:
            await asyncio.sleep(PROGRESS_CHECK)
            now = time.monotonic()
            for replica in self.replicas:
                if not self._alive(replica) or replica.failure_note:
                    continue
                box, progress = self.mailboxes[replica.name], replica.progress
                quiet = progress.quiet_for(box.step[0], box.status.seq[0], now)
                # Before its first step a replica may take long (imports, data, rendezvous):
                # only --step-timeout, which the user chose, calls that a hang.
                hung = progress.step > 0 and quiet >= max(hang_after(), 10 * progress.step_time)
                hung = hung or (timeout is not None and quiet >= timeout)
                if hung != progress.hung:
                    progress.hung = hung
                    if hung:
                        say(f"{replica.name} took no step for {quiet:.0f}s: it looks hung")
                    if self.control is not None:
                        self.control.replica_hung(replica.name, hung)
                if timeout is not None and quiet >= timeout:
                    self._terminate(replica, f"no step for {timeout:g}s (--step-timeout)")

    def _open_mailboxes(self) -> None:
        """One segment per replica, before any worker starts; kept across restarts."""
        swept = sweep_stale()
        if swept:
            say(f"removed {len(swept)} shared-memory segment(s) left by loomrun jobs that died")
        for port in sweep_orphan_brokers():
            say(f"stopped the bundled NATS broker on port {port}, which no loomrun job used")
        for replica in self.replicas:
            path = new_segment_path(self.spec.job, replica.name)
            self.watchdog.tell(f"segment {path}")
            self.mailboxes[replica.name] = Mailbox.create(path)

    # -- the run directory (error files, logs) ---------------------------------------

    def _prepare_run_dir(self) -> None:
        if self.spec.log_dir is not None:
            self._run_dir = Path(self.spec.log_dir) / self.spec.job
            self._run_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._run_dir = Path(tempfile.mkdtemp(prefix=f"loomrun-{self.spec.job}-"))
            self._own_run_dir = True

    def _release_run_dir(self) -> None:
        if self._own_run_dir and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)


def run(spec: LaunchSpec) -> int:
    return asyncio.run(Supervisor(spec).run())
