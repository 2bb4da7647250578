"""Two supervisors on this machine stand in for two nodes of one DDP job (2 x 2 ranks,
gloo): one job on the broker, one change at one step on all four ranks, and a failure on
one node restarting (or stopping) both."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import pytest
from conftest import SCRIPTS, run_loomrun, wait_for
from jobs import events, job_id, steering, wait_ready
from nats.js.errors import BucketNotFoundError
from netcut import CuttableProxy

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.broker.connect import host_port
from loomrun.broker.state import state_dir
from loomrun.client import SteerError
from loomrun.launch import free_port
from loomrun.records import job_dir, read_changes


def start_nodes(procs, job: str, *args, extra=()) -> list:
    port = free_port()
    nodes = []
    for rank in (0, 1):
        nodes.append(procs.start(
            "--nnodes", "2", "--node-rank", rank, "--nproc-per-node", "2", "--master-addr",
            "127.0.0.1", "--master-port", port, "--job", job, *extra,
            SCRIPTS / "ddp_seeded.py", *args,
        ))  # fmt: skip
    return nodes


def drain(proc) -> list[str]:
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return lines


def hashes(lines: list[str]) -> dict[str, str]:
    return {m[1]: m[2] for line in lines if (m := re.match(r"\[(r\d)\] hash (\w+)", line))}


def desired_watches(job: str) -> list[list[str]]:
    """The subjects of every consumer on the desired-config bucket that watches `job`."""

    async def work(s):
        found = await s.js.consumers_info(f"KV_{S.DESIRED}")
        # Bound ones only, once each: a consumer an ordered watch replaced after a missed
        # heartbeat lingers, unbound, until its inactivity threshold.
        subjects = {
            tuple(c.config.filter_subjects or [c.config.filter_subject])
            for c in found
            if c.push_bound
        }
        return [list(f) for f in subjects if any(f".{job}." in x for x in f)]

    return steering(work)


def rows(job: str) -> dict[str, dict]:
    shown = json.loads(run_loomrun("watch", "--once", "--json", "--job", job).stdout)
    return {r["replica"]: r for r in shown["jobs"][0]["replicas"]}


@pytest.mark.slow
def test_two_nodes_are_one_job_and_one_change_lands_at_one_step(procs):
    job = job_id("nodes")
    nodes = start_nodes(procs, job, "--steps", "600", "--step-time", "0.01")
    outputs = [drain(n) for n in nodes]
    names = ["r0", "r1", "r2", "r3"]
    wait_ready(job, names, timeout=120)
    (listed,) = [
        j for j in json.loads(run_loomrun("ls", "--json").stdout)["jobs"] if j["job"] == job
    ]
    assert listed["replicas"] == names and len(listed["hosts"]) == 1 and listed["nodes"] == 2
    result = run_loomrun("set", "lr=0.02", "--job", job, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    changes = json.loads(result.stdout)["changes"]
    assert sorted(c["replica"] for c in changes) == names
    assert len({c["step"] for c in changes}) == 1, f"one step for all four ranks: {changes}"
    assert set(rows(job)) == set(names)
    # Each node is delivered its own replicas' changes only, not the whole job's.
    watched = sorted(sorted(f.split(".")[3] for f in filters) for filters in desired_watches(job))
    assert watched == [["r0", "r1"], ["r2", "r3"]], watched
    for node in nodes:
        node.wait(180)
        assert node.returncode == 0, node.stderr.read()
    final = {**hashes(outputs[0]), **hashes(outputs[1])}
    assert set(final) == set(names) and len(set(final.values())) == 1, final
    # Two nodes sharing a state directory keep one ledger file each, read as one.
    folder = job_dir(state_dir(), job)
    assert (folder / "changes.jsonl").is_file() and (folder / "changes.node1.jsonl").is_file()
    ids = {c["change_id"] for c in changes}
    kept = [r for r in read_changes(folder) if r["change_id"] in ids]
    assert sorted(r["replica"] for r in kept) == names, kept
    shown = run_loomrun("log", "--job", job, "--json", "--nats", "nats://127.0.0.1:1")
    assert shown.returncode == 0, shown.stderr
    logged = [json.loads(line) for line in shown.stdout.splitlines()]
    assert sorted(r["replica"] for r in logged if r["change_id"] in ids) == names


@pytest.mark.slow
@pytest.mark.parametrize("restarts", [0, 1])
def test_a_worker_killed_on_one_node_stops_or_restarts_both(procs, restarts):
    """The replicas here share no collective (tests/scripts/steered.py), so node 0 learns
    of node 1's failure only from node 1's word on the broker."""
    job = job_id("nodefail")
    port = free_port()
    nodes = [
        procs.start(
            "--nnodes", "2", "--node-rank", rank, "--nproc-per-node", "2", "--master-addr",
            "127.0.0.1", "--master-port", port, "--job", job, "--max-restarts", restarts,
            SCRIPTS / "steered.py", "--steps", "1500", "--step-time", "0.01", "--quiet",
        )
        for rank in (0, 1)
    ]  # fmt: skip
    wait_ready(job, ["r0", "r1", "r2", "r3"], timeout=120)
    victim = wait_for(lambda: rows(job)["r3"]["pid"], 30, what="r3's pid")
    os.kill(victim, signal.SIGKILL)
    for node in nodes:
        node.wait(180)
    errors = [n.stderr.read() for n in nodes]
    if restarts:
        assert [n.returncode for n in nodes] == [0, 0], errors
        assert "restarting all replicas (restart 1/1): r3 killed by SIGKILL" in errors[1]
        assert "restarting all replicas (restart 1/1): node 1: r3 killed by SIGKILL" in errors[0]
        assert all(r["restarts"] == 1 for r in rows(job).values())
    else:
        assert nodes[1].returncode == 137 and nodes[0].returncode == 137, errors
        assert "node 1: r3 killed by SIGKILL" in errors[0] and "past its restarts" in errors[0]


@pytest.mark.slow
def test_a_node_stopped_by_a_signal_stops_the_other_one(procs):
    """Ctrl-C (or the scheduler's SIGTERM) on one node ends the job on every node, even
    with restarts left: a stop is not a failure to restart from."""
    job = job_id("nodestop")
    port = free_port()
    nodes = [
        procs.start(
            "--nnodes", "2", "--node-rank", rank, "--nproc-per-node", "1", "--master-addr",
            "127.0.0.1", "--master-port", port, "--job", job, "--max-restarts", "3",
            SCRIPTS / "steered.py", "--steps", "100000", "--step-time", "0.01", "--quiet",
        )
        for rank in (0, 1)
    ]  # fmt: skip
    wait_ready(job, ["r0", "r1"], timeout=120)
    nodes[0].send_signal(signal.SIGTERM)
    for node in nodes:
        node.wait(120)
    errors = [n.stderr.read() for n in nodes]
    assert [n.returncode for n in nodes] == [143, 143], errors
    assert "node 0: stopped by SIGTERM; stopping this node's replicas" in errors[1], errors[1]
    assert "restarting" not in errors[0] + errors[1]


@pytest.mark.slow
def test_a_node_away_when_the_other_restarts_follows_it_on_reconnecting(procs):
    """Node 0 is cut off from the broker when node 1's group fails and restarts: the live
    word does not reach it, the record of it does, when node 0 is back."""
    job = job_id("away")
    port, broker = free_port(), host_port(os.environ["LOOMRUN_NATS"])[1]
    proxy = CuttableProxy(broker)
    try:
        nodes = [
            procs.start(
                "--nnodes", "2", "--node-rank", rank, "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", port, "--job", job, "--max-restarts", "1",
                SCRIPTS / "steered.py", "--steps", "2500", "--step-time", "0.01", "--quiet",
                env={"LOOMRUN_NATS": f"nats://127.0.0.1:{proxy.port}"} if rank == 0 else None,
            )
            for rank in (0, 1)
        ]  # fmt: skip
        wait_ready(job, ["r0", "r1", "r2", "r3"], timeout=120)
        victim = wait_for(lambda: rows(job)["r3"]["pid"], 30, what="r3's pid")
        proxy.cut()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: rows(job)["r3"]["restarts"] == 1, 60, what="node 1's restart")
        assert rows(job)["r0"]["restarts"] == 0, "node 0 heard it while cut off"
        proxy.restore()
        wait_for(lambda: rows(job)["r0"]["restarts"] == 1, 60, what="node 0 following it")
        for node in nodes:
            node.wait(180)
        errors = [n.stderr.read() for n in nodes]
        assert [n.returncode for n in nodes] == [0, 0], errors
        assert "restarting all replicas (restart 1/1): node 1: r3 killed by SIGKILL" in errors[0]
        assert errors[0].count("restarting all replicas") == 1, errors[0]
    finally:
        proxy.close()


@pytest.mark.slow
def test_an_earlier_runs_failure_is_not_followed_whatever_its_clock_says(procs):
    """Node 2's failure record from an earlier run of the same job id, written by a clock
    an hour ahead: the broker's order puts it before node 0's start, and its time after
    node 0's mark there, which no record written before the mark can honestly say; so
    node 0 leaves it alone (a comparison with node 0's start alone followed it)."""
    job = job_id("stale")
    word = pb.GroupFailure(
        job=job, node_rank=2, attempt=0, give_up=True, reason="r2 killed by SIGKILL",
        exit_code=137, time=time.time() + 3600,
    )  # fmt: skip

    async def plant(s):
        try:
            kv = await s.js.key_value(S.STATE)
        except BucketNotFoundError:  # the first job on this broker: loomrun's own settings
            kv = await s.js.create_key_value(bucket=S.STATE, history=1)
        await kv.put(S.node_failure_record(job, 2), word.SerializeToString())

    steering(plant)
    node = procs.start(
        "--nnodes", "3", "--node-rank", "0", "--nproc-per-node", "1", "--master-addr",
        "127.0.0.1", "--master-port", free_port(), "--job", job,
        SCRIPTS / "steered.py", "--steps", "100000", "--step-time", "0.01", "--quiet",
    )  # fmt: skip
    wait_ready(job, ["r0"], timeout=120)  # connected, and read the records long before
    assert run_loomrun("set", "lr=0.05", "--job", job).returncode == 0
    node.send_signal(signal.SIGTERM)
    node.wait(60)
    errors = node.stderr.read()
    assert node.returncode == 143 and "node 2" not in errors, errors


@pytest.mark.slow
def test_a_failure_recorded_while_away_is_followed_whatever_its_clock_says(procs):
    """Node 0 is cut off when node 2's group fails. Node 2 is not run here: its word is
    written where its supervisor would write it, by a clock an hour behind node 0's. The
    broker's order puts it after node 0's start, so node 0 follows it once back; a
    comparison of the record's time with node 0's own start (as loomrun made before) left
    it, and node 0 waited on ranks that had restarted."""
    job = job_id("behind")
    proxy = CuttableProxy(host_port(os.environ["LOOMRUN_NATS"])[1])
    word = pb.GroupFailure(
        job=job, node_rank=2, attempt=1, reason="r2 killed by SIGKILL", exit_code=137,
        time=time.time() - 3600,
    )  # fmt: skip

    async def record(s):
        await (await s.js.key_value(S.STATE)).put(
            S.node_failure_record(job, 2), word.SerializeToString()
        )

    try:
        node = procs.start(
            "--nnodes", "3", "--node-rank", "0", "--nproc-per-node", "1", "--master-addr",
            "127.0.0.1", "--master-port", free_port(), "--job", job, "--max-restarts", "1",
            SCRIPTS / "steered.py", "--steps", "100000", "--step-time", "0.01", "--quiet",
            env={"LOOMRUN_NATS": f"nats://127.0.0.1:{proxy.port}"},
        )  # fmt: skip
        wait_ready(job, ["r0"], timeout=120)
        proxy.cut()
        steering(record)
        proxy.restore()
        wait_for(lambda: rows(job)["r0"]["restarts"] == 1, 60, what="node 0 following node 2")
        node.send_signal(signal.SIGTERM)
        node.wait(60)
        errors = node.stderr.read()
        assert "restarting all replicas (restart 1/1): node 2: r2 killed by SIGKILL" in errors
    finally:
        proxy.close()


@pytest.mark.slow
def test_a_late_node_0_forgets_an_earlier_runs_ledger_and_not_this_ones(procs):
    """Node 1 answers a change before node 0 is up. Node 0's start forgets the parts of the
    job's ledger in the broker that an earlier run left (here node 2's, of a run of three
    nodes), not node 1's of this run: it once purged the whole job's ledger, and node 1's
    change was gone from the broker's record."""
    job, port = job_id("lateledger"), free_port()
    earlier = pb.Outcome(replica="r2", name="lr", state=pb.APPLIED, change_id="an-earlier-run")

    def node(rank: int):
        return procs.start(
            "--nnodes", "2", "--node-rank", rank, "--nproc-per-node", "1", "--master-addr",
            "127.0.0.1", "--master-port", port, "--job", job,
            SCRIPTS / "steered.py", "--steps", "100000", "--step-time", "0.01", "--quiet",
        )  # fmt: skip

    def change(replica: str) -> str:
        result = run_loomrun("set", "lr=0.05", "--job", job, "--replica", replica, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)["changes"][0]["change_id"]

    async def plant(s):
        await s.js.publish(S.ledger(job, 2), earlier.SerializeToString())

    nodes = [node(1)]
    wait_ready(job, ["r1"], timeout=120)
    steering(plant)
    before = change("r1")
    nodes.insert(0, node(0))
    wait_ready(job, ["r0", "r1"], timeout=120)  # r0's schema is written after node 0's purge
    after = change("r0")
    for n in nodes:
        n.send_signal(signal.SIGTERM)
    for n in nodes:
        n.wait(60)
    shown = run_loomrun("log", "--job", job, "--json")
    assert shown.returncode == 0, shown.stderr
    logged = [json.loads(line)["change_id"] for line in shown.stdout.splitlines()]
    assert logged == [before, after], logged


@pytest.mark.slow
def test_a_run_on_fewer_nodes_is_steered_and_shown_without_the_earlier_runs_ranks(procs):
    """A job id run again on one node after a run on two: the second node's record and
    its replica's status are still on the broker, and are not this run's (a `set` once
    waited on r1 for ever and exited 3, and `watch` showed it)."""
    job, port = job_id("fewer"), free_port()
    for rank in (0, 1):
        procs.start(
            "--nnodes", "2", "--node-rank", rank, "--nproc-per-node", "1", "--master-addr",
            "127.0.0.1", "--master-port", port, "--job", job,
            SCRIPTS / "steered.py", "--steps", "50", "--step-time", "0.01", "--quiet",
        )  # fmt: skip
    wait_ready(job, ["r0", "r1"], timeout=120)
    for node in procs.started:
        assert node.wait(120) == 0, node.stderr.read()
    again = procs.start(
        "--job", job, SCRIPTS / "steered.py", "--steps", "100000", "--step-time", "0.01", "--quiet"
    )
    wait_for(lambda: rows(job).keys() == {"r0"} and rows(job)["r0"]["state"] == "running", 60,
             what="this run's r0 alone")  # fmt: skip
    wait_ready(job)  # its schema: after its start forgot the earlier run's
    result = run_loomrun("set", "lr=0.05", "--job", job, "--json", "--timeout", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [c["replica"] for c in json.loads(result.stdout)["changes"]] == ["r0"]
    (listed,) = [
        j for j in json.loads(run_loomrun("ls", "--json").stdout)["jobs"] if j["job"] == job
    ]
    assert listed["replicas"] == ["r0"] and listed["nodes"] == 1, listed
    again.send_signal(signal.SIGTERM)
    again.wait(60)


@pytest.mark.slow
def test_a_change_waiting_at_a_restart_lands_on_every_rank_at_one_step(procs):
    """Node 1 is cut off from the broker when a change is sent: it reaches rank 0 only,
    whose agreement then waits for rank 1. Both ranks die and restart, and node 1 gets the
    change once back. The restart used to turn rank 0's waiting change into one applied at
    once, alone: rank 1 then waited for an agreement that never came, and the ranks trained
    apart for good."""
    job, port = job_id("waiting"), free_port()
    proxy = CuttableProxy(host_port(os.environ["LOOMRUN_NATS"])[1])
    try:
        nodes = [
            procs.start(
                "--nnodes", "2", "--node-rank", rank, "--nproc-per-node", "1", "--master-addr",
                "127.0.0.1", "--master-port", port, "--job", job, "--max-restarts", "1",
                "--grace", "3", SCRIPTS / "ddp_seeded.py", "--steps", "100000",
                "--step-time", "0.01",
                env={"LOOMRUN_NATS": f"nats://127.0.0.1:{proxy.port}"} if rank == 1 else None,
            )
            for rank in (0, 1)
        ]  # fmt: skip
        said: list[str] = []
        threading.Thread(target=lambda: said.extend(nodes[1].stderr), daemon=True).start()
        wait_ready(job, ["r0", "r1"], name="loss_scale", timeout=120)
        first = run_loomrun("set", "loss_scale=3", "--job", job, "--json")
        assert first.returncode == 0, first.stdout + first.stderr
        earlier = json.loads(first.stdout)["changes"][0]["change_id"]
        pids = {name: row["pid"] for name, row in rows(job).items()}
        proxy.cut()
        sent = run_loomrun("set", "loss_scale=2", "--job", job, "--no-wait", "--json")
        assert sent.returncode == 0, sent.stderr
        change = json.loads(sent.stdout)["changes"][0]["change_id"]
        for pid in pids.values():  # a rank left alone in a collective may wait for ever
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: rows(job)["r0"]["restarts"] == 1, 60, what="node 0's restart")
        wait_for(lambda: any("restarting all replicas" in line for line in said), 60,
                 what="node 1's restart, before it hears of the change")  # fmt: skip
        proxy.restore()

        def answers(change_id: str) -> list[dict]:
            shown = run_loomrun("log", "--job", job, "--json").stdout.splitlines()
            return [r for r in map(json.loads, shown) if r["change_id"] == change_id]

        landed = wait_for(lambda: len(got := answers(change)) == 2 and got, 90,
                          what="both answers")  # fmt: skip
        assert sorted(r["replica"] for r in landed) == ["r0", "r1"], landed
        assert {r["outcome"] for r in landed} == {"applied"}, landed
        assert len({r["step"] for r in landed}) == 1, f"one step for both ranks: {landed}"
        # Meanwhile each restarted rank trained with the change in effect, not the script's
        # own value: both applied it again before their first step, an event each. The
        # ledger keeps the change's one record per replica: a re-answer is no record.
        shown = [e.replica for e in events(job) if e.kind == "applied" and "-> 3 " in e.text]
        assert sorted(shown) == ["r0", "r0", "r1", "r1"], shown
        once = sorted(r["replica"] for r in answers(earlier))
        assert once == ["r0", "r1"], answers(earlier)
    finally:
        proxy.close()


@pytest.mark.slow
def test_a_change_to_a_group_with_a_node_not_yet_on_the_broker_is_refused(procs):
    """Node 1 cannot reach the broker: its rank trains in the group, but the broker knows
    only node 0's. A `set` to "every replica" once went to rank 0 alone and waited for an
    agreement that could not come (exit 3); it is refused, and once node 1 is there, it
    lands on both ranks at one step."""
    job, port = job_id("unlisted"), free_port()
    proxy = CuttableProxy(host_port(os.environ["LOOMRUN_NATS"])[1])
    proxy.cut()
    try:
        for rank in (0, 1):
            procs.start(
                "--nnodes", "2", "--node-rank", rank, "--nproc-per-node", "1", "--master-addr",
                "127.0.0.1", "--master-port", port, "--job", job, SCRIPTS / "ddp_seeded.py",
                "--steps", "100000", "--step-time", "0.01",
                env={"LOOMRUN_NATS": f"nats://127.0.0.1:{proxy.port}"} if rank == 1 else None,
            )  # fmt: skip

        async def group_size(s):
            try:
                return (await s.schemas(job)).get("r0", None)
            except SteerError:  # before the first job on this broker made its buckets
                return None

        wait_for(lambda: (found := steering(group_size)) and found.group_size == 2, 120,
                 what="rank 0 in its group of 2")  # fmt: skip
        refused = run_loomrun("set", "loss_scale=2", "--job", job)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "only 1 are registered on the broker" in refused.stderr
        proxy.restore()
        wait_ready(job, ["r0", "r1"], name="loss_scale", timeout=60)
        landed = run_loomrun("set", "loss_scale=2", "--job", job, "--json")
        assert landed.returncode == 0, landed.stdout + landed.stderr
        changes = json.loads(landed.stdout)["changes"]
        assert sorted(c["replica"] for c in changes) == ["r0", "r1"]
        assert len({c["step"] for c in changes}) == 1, changes
    finally:
        proxy.close()


@pytest.mark.slow
def test_the_same_command_on_every_node_agrees_on_ranks_through_c10d(procs):
    """As SLURM scripts run torchrun: no --node-rank, no master; the nodes meet at the
    rendezvous endpoint and agree."""
    job = job_id("rdzv")
    command = [
        "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-id", job, "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{free_port()}", SCRIPTS / "ddp_seeded.py", "--steps",
        "300", "--step-time", "0.01",
    ]  # fmt: skip
    nodes = [procs.start(*command), procs.start(*command)]
    outputs = [drain(n) for n in nodes]
    names = ["r0", "r1", "r2", "r3"]
    wait_ready(job, names, timeout=180)
    result = run_loomrun("set", "lr=0.02", "--job", job, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len({c["step"] for c in json.loads(result.stdout)["changes"]}) == 1
    errors = []
    for node in nodes:
        node.wait(180)
        errors.append(node.stderr.read())
        assert node.returncode == 0, errors[-1]
    ranks = sorted(int(re.search(r"node rank (\d) of 2", text)[1]) for text in errors)
    assert ranks == [0, 1], errors
    final = {**hashes(outputs[0]), **hashes(outputs[1])}
    assert set(final) == set(names) and len(set(final.values())) == 1, final


@pytest.mark.parametrize("nnodes, nproc", [("3", "1"), ("2", "2")])
def test_a_node_started_with_another_shape_is_refused_before_it_takes_a_rank(procs, nnodes, nproc):
    """Mismatched --nnodes or --nproc-per-node would hang the workers' own rendezvous: the
    node that differs from the first one is told so, in one line, and exits."""
    job = job_id("shape")
    where = ["--rdzv-id", job, "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{free_port()}", "--job", job]  # fmt: skip
    first = procs.start(
        "--nnodes", "2", "--nproc-per-node", "1", *where, SCRIPTS / "ddp_seeded.py", "--steps", "1"
    )
    said: list[str] = []
    threading.Thread(target=lambda: said.extend(first.stderr), daemon=True).start()
    wait_for(lambda: any("node rank 0 of 2" in line for line in said), 60, what="node 0")
    other = ["--nnodes", nnodes, "--nproc-per-node", nproc]
    result = run_loomrun(*other, *where, SCRIPTS / "ddp_seeded.py", timeout=60)
    assert result.returncode == 1, result.stderr
    assert "was started with --nnodes 2 --nproc-per-node 1, this node with" in result.stderr
    assert "Traceback" not in result.stderr and "node rank" not in result.stderr
    assert first.poll() is None  # the first node still waits for a rightful second one


@pytest.mark.parametrize(
    "args, message",
    [(["--rdzv-backend", "c10d", "--nnodes", "2"], "needs --rdzv-endpoint")],
)
def test_rendezvous_usage_errors_are_one_line(args, message):
    """Before the rendezvous: a node that cannot start takes no rank from the others (in a
    real process; every case: tests/unit/test_cli.py)."""
    result = run_loomrun(*args, SCRIPTS / "exit_with.py", "0")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "waiting for" not in result.stderr
