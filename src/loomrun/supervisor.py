"""Spawns the workers and owns their lifetime: environment, signals, restarts, failures.

The supervisor never imports torch: starting it costs a Python start-up, not a torch import.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from loomrun.broker.bundled import sweep_orphan_brokers
from loomrun.launch import LaunchSpec, describe_exit, exit_code_of, free_port, worker_env
from loomrun.launch.health import watch_progress
from loomrun.launch.jobdirs import JobDirs
from loomrun.launch.processes import Replica, Workers
from loomrun.lifeline import parent_env
from loomrun.mailbox import Mailbox, MailboxError, new_segment_path, sweep_stale
from loomrun.output import say
from loomrun.printable import printable
from loomrun.watchdog import Watchdog

EXIT_STOPPED_BY = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
# A closed terminal or a dropped ssh session (SIGHUP) stops the job like SIGTERM does.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Supervisor:
    """Runs one node's replicas until they finish, fail past their restarts, or are stopped."""

    def __init__(self, spec: LaunchSpec):
        self.spec = spec
        self.replicas = [Replica(name, i) for i, name in enumerate(spec.replica_names())]
        self.restarts_of_all = 0
        self.master_port = spec.master_port or free_port()
        self._stop_signal: signal.Signals | None = None
        self._stop_requested = asyncio.Event()
        self.mailboxes: dict[str, Mailbox] = {}
        self.control = None
        self.watchdog = Watchdog()
        self.workers = Workers(spec.grace, self.watchdog.tell, spec.console_filter)
        self.started = 0.0
        self.dirs = JobDirs(spec)
        self._remote_failures: asyncio.Queue = asyncio.Queue()  # other nodes' GroupFailures
        self._saves = 0  # SIGUSR1s so far
        self._save_asked = False  # a SIGUSR1 came before the control plane was up

    # -- the main loop ---------------------------------------------------------

    async def run(self) -> int:
        """The job, from the claim of its id to the last replica's end. The console is
        written out on every way out, before the console script's os._exit."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGUSR1, self._on_save_signal)
        try:
            return await self._run()
        finally:
            self.workers.close()
            for sig in (*STOP_SIGNALS, signal.SIGUSR1):
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        self.started = time.time()  # this run's, for what is on disk and on the broker
        self.watchdog.start()  # armed before there is anything it must clean up
        refusal = self.dirs.claim(self.started)
        if refusal:
            say(refusal)
            self.watchdog.close()
            return 2
        for line in self.spec.notices():
            say(line)
        code = 1
        try:
            for line in sweep_leftovers():
                say(line)
            open_mailboxes(self.spec.job, self.replicas, self.watchdog.tell, self.mailboxes)
            for replica in self.replicas:
                await self._start(replica)
            await self._start_control()  # after the spawns: importing nats alone takes 0.3 s
            progress = asyncio.ensure_future(
                watch_progress(self.replicas, self.mailboxes, self.spec.step_timeout, self._hung,
                               self._terminate)
            )  # fmt: skip
            try:
                code = await self._watch()
            finally:
                progress.cancel()
            return code
        except MailboxError as error:
            say(str(error))
            return 1
        finally:
            await self.workers.stop([r for r in self.replicas if r.alive], signal.SIGTERM)
            for replica in self.replicas:
                self.workers.reap(replica)
                await self.workers.drain(replica)
            if self.control is not None:
                await self.control.close(code)
            for mailbox in self.mailboxes.values():
                mailbox.unlink()
            self.dirs.release()
            self.watchdog.close()  # last: had cleaning up failed, the watchdog does it

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
                    self.workers.reap(replica)
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
        await self.workers.drain(replica)
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
            alive = [r for r in self.replicas if r.alive]
            past = "" if word.stopped else ", past its restarts"
            say(f"{why}{past}; stopping this node's replicas")
            await self.workers.stop(alive, signal.SIGTERM)
            return None
        if word.attempt <= self.restarts_of_all:
            return []  # this node is at that restart already
        self.restarts_of_all = word.attempt - 1
        for replica in self.replicas:
            if replica.alive:
                self._tell_exit(replica, 0, f"stopped to restart with {why}", restarting=True)
        return await self._restart_all(f"(restart {word.attempt}/{self.spec.max_restarts}): {why}")

    async def _restart_all(self, why: str) -> list[Replica]:
        self.restarts_of_all += 1
        say(f"restarting all replicas {why}")
        await self.workers.stop([r for r in self.replicas if r.alive], signal.SIGTERM)
        for r in self.replicas:
            await self.workers.drain(r)
            r.restarts = self.restarts_of_all
            r.finished = False
            r.failure_note = ""  # of the worker stopped here, not of the next one
        for r in self.replicas:  # every mailbox ready before any worker starts: one baseline
            self._prepare_restart(r)
        for r in self.replicas:
            await self._start(r)
        return list(self.replicas)

    def _prepare_restart(self, replica: Replica) -> None:
        """A clean mailbox for the next worker, holding the desired state to start from."""
        if self.control is not None:
            self.control.replica_restarting(replica.name)
        else:
            from loomrun.desired import restart_from  # protobuf: not before the first spawn

            restart_from(self.mailboxes[replica.name])

    async def _fail(self, replica: Replica, returncode: int) -> None:
        others = [r for r in self.replicas if r is not replica and r.alive]
        for line in replica.failure(describe_exit(returncode), bool(others)):
            say(line)
        await self.workers.stop(others, signal.SIGTERM)

    # -- signals -------------------------------------------------------------------

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop_signal is not None:
            say(f"second {sig.name}: killing every worker now")
            for replica in self.replicas:
                self.workers.signal(replica, signal.SIGKILL)
            return
        self._stop_signal = sig
        self._stop_requested.set()

    def _on_save_signal(self) -> None:
        """SIGUSR1, as a cluster's scheduler sends before it preempts a job: `loomrun save`
        of every replica, to --save-dir. With a broker, node 0 writes it for every replica
        of the job, as a client would (one change, which the ranks of every node agree on);
        the other nodes leave it to node 0. With none, each node saves its own replicas."""
        import hashlib

        from loomrun.desired import ask_once, change
        from loomrun.subjects import SAVE

        if self.spec.broker is not None and self.control is None:
            self._save_asked = True  # done once the control plane is up
            return
        if self.control is not None and self.spec.node_rank != 0:
            say("got SIGUSR1: node 0 saves every replica of the job (signal node 0)")
            return
        self._saves += 1
        base = self.spec.save_dir or (self.dirs.records[0] / "saves" if self.dirs.records else None)
        if base is None:
            say("got SIGUSR1, but there is no folder to save to: launch with --save-dir DIR")
            return
        folder = base.absolute() / f"usr1-{self._saves}-step-{{step}}"
        # With no broker each node asks its own ranks: one id from the job and the count
        # of signals, so that ranks of several nodes, all signalled, agree on one change.
        counted = hashlib.blake2b(f"{self.spec.job}/usr1/{self._saves}".encode(), digest_size=8)
        want = change(
            {"dir": str(folder)}, origin="SIGUSR1",
            change_id="" if self.control is not None else counted.hexdigest(),
        )  # fmt: skip
        say(f"got SIGUSR1: saving every replica to {folder} (step: the step it is taken at)")
        if self.control is not None:
            every = [f"r{rank}" for rank in range(self.spec.world_size)]
            self.control.ask(SAVE, want, every)
            return
        for replica in self.replicas:
            if replica.name in self.mailboxes:
                ask_once(self.mailboxes[replica.name], SAVE, want)

    async def _stop_on_signal(self) -> int:
        sig = self._stop_signal
        code = EXIT_STOPPED_BY.get(sig, 128 + int(sig))
        self._tell_nodes(self.restarts_of_all, True, f"stopped by {sig.name}", code, stopped=True)
        passed = signal.SIGTERM if sig == signal.SIGHUP else sig  # scripts handle SIGTERM
        alive = [r for r in self.replicas if r.alive]
        if alive:
            say(
                f"got {sig.name}: passing {passed.name} to {len(alive)} worker(s), "
                f"SIGKILL after {self.spec.grace:g}s (again to kill now)"
            )
        await self.workers.stop(alive, passed)
        return code

    # -- processes -----------------------------------------------------------------

    async def _start(self, replica: Replica) -> None:
        spec = self.spec
        attempt = self.dirs.attempt(replica.name, replica.restarts)
        replica.error_file = attempt / "error.json"
        replica.error_file.unlink(missing_ok=True)
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
        if plan := (spec.replay or {}).get(replica.name):
            env["LOOMRUN_REPLAY"] = str(self.dirs.replay_plan(replica.name, plan))
        logs = attempt if spec.log_dir else None
        await self.workers.spawn(replica, spec.worker_command(), env, logs)
        if self.control is not None:
            self.control.replica_started(replica.name, replica.proc.pid, replica.restarts)

    async def _start_control(self) -> None:
        """The NATS side: it connects while the workers start up, never ahead of them."""
        if self.spec.broker is None:
            return
        from loomrun.control.plane import ControlPlane

        self.control = ControlPlane.of(
            self.spec, self.replicas, self.mailboxes, self.dirs.records, self.started,
            on_device_failure=self.fail_device, on_node_failure=self._remote_failures.put_nowait,
            tell=self.watchdog.tell,
        )  # fmt: skip
        await self.control.start()
        if self._save_asked:
            self._on_save_signal()

    def _tell_exit(self, replica: Replica, code: int, text: str, restarting: bool = False) -> None:
        if self.control is not None:
            self.control.replica_exited(replica.name, code, text, restarting)

    def fail_device(self, name: str, note: str) -> None:
        """A health checker says this replica's device failed: stop it; the policy decides."""
        for replica in self.replicas:
            if replica.name == name and replica.alive:
                self._terminate(replica, note)

    def _terminate(self, replica: Replica, note: str) -> None:
        """Stop one replica as a failure (the restart policy decides what follows): SIGTERM,
        and SIGKILL after the grace period if that very process still runs."""
        say(f"{replica.name}: {note}; stopping it")
        replica.failure_note = note
        self.workers.terminate(replica)

    def _hung(self, replica: Replica, hung: bool, quiet: float) -> None:
        if hung:
            say(f"{replica.name} took no step for {quiet:.0f}s: it looks hung")
        if self.control is not None:
            self.control.replica_hung(replica.name, hung)


def sweep_leftovers() -> list[str]:
    """What loomrun jobs that died left (shared memory, a bundled broker nobody uses),
    removed; a line for each kind."""
    lines = []
    swept = sweep_stale()
    if swept:
        lines.append(
            f"removed {len(swept)} shared-memory segment(s) left by loomrun jobs that died"
        )
    for port in sweep_orphan_brokers():
        lines.append(f"stopped the bundled NATS broker on port {port}, which no loomrun job used")
    return lines


def open_mailboxes(job: str, replicas: list[Replica], tell, into: dict[str, Mailbox]) -> None:
    """One segment per replica, before any worker starts; kept across restarts. Each goes
    `into` as it is made (the supervisor unlinks what is there, whatever fails next), and
    the watchdog (`tell`) removes them if the supervisor dies."""
    for replica in replicas:
        path = new_segment_path(job, replica.name)
        tell(f"segment {path}")
        into[replica.name] = Mailbox.create(path)


def run(spec: LaunchSpec) -> int:
    return asyncio.run(Supervisor(spec).run())
