"""A job on a 3-server NATS cluster (nats-server's own clustering, JetStream on, routes on
loopback), its two nodes' supervisors connected to different members: steering through
any member works, and stopping a member mid-run loses no change."""

from __future__ import annotations

import asyncio
import json
import signal
import threading

import pytest
from conftest import SCRIPTS, run_loomrun, wait_for
from jobs import job_id, wait_ready

from loomrun.broker.connect import BrokerOptions, answers, host_port
from loomrun.client import Steering
from loomrun.launch import free_port


def cluster_ready(url: str) -> bool:
    """JetStream answers through this member: the cluster has its meta leader."""

    async def probe() -> bool:
        try:
            async with Steering.connect(BrokerOptions(url), timeout=2) as steering:
                await steering.js.account_info()
                return True
        except Exception:  # noqa: BLE001 - not yet
            return False

    return asyncio.run(probe())


def start_members(procs, started=range(3)) -> tuple[list, list[str], object]:
    """Members of one 3-server cluster: those `started` now, and how to start another."""
    ports, routes = [free_port() for _ in range(3)], [free_port() for _ in range(3)]

    def member(i: int):
        others = ",".join(f"nats://127.0.0.1:{routes[j]}" for j in range(3) if j != i)
        return procs.start(
            "server", "--port", ports[i], "--cluster", f"127.0.0.1:{routes[i]}",
            "--routes", others,
        )  # fmt: skip

    members = [member(i) for i in started]
    urls = [f"nats://127.0.0.1:{p}" for p in ports]
    if len(members) == 3:
        for url in urls:
            wait_for(lambda url=url: cluster_ready(url), 60, interval=0.5,
                     what=f"JetStream at {url}")  # fmt: skip
    return members, urls, member


def set_everywhere(job: str, url: str, value: float) -> list[dict]:
    result = run_loomrun("set", f"lr={value}", "--job", job, "--nats", url, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)["changes"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_on_a_nats_cluster_survives_losing_a_member(procs):
    members, urls, _ = start_members(procs)
    job = job_id("cluster")
    port = free_port()
    for rank in (0, 1):
        procs.start(
            "--nnodes", "2", "--node-rank", rank, "--nproc-per-node", "2", "--master-addr",
            "127.0.0.1", "--master-port", port, "--job", job, "--nats", urls[rank],
            SCRIPTS / "steered.py", "--steps", "100000000", "--step-time", "0.01", "--quiet",
            env={"LOOMRUN_NATS_REPLICAS": "3"},
        )  # fmt: skip
    names = ["r0", "r1", "r2", "r3"]
    wait_ready(job, names, url=urls[2], timeout=120)
    changes = set_everywhere(job, urls[2], 0.05)  # through the member neither node uses
    assert sorted(c["replica"] for c in changes) == names

    members[1].send_signal(signal.SIGTERM)  # node 1's member goes away mid-run
    members[1].wait(30)

    def applied_everywhere():
        result = run_loomrun("set", "lr=0.07", "--job", job, "--nats", urls[0], "--json")
        return json.loads(result.stdout)["changes"] if result.returncode == 0 else None

    # The first tries may meet the cluster electing new leaders; a try that is not answered
    # leaves the change desired, and the next one is the same value.
    changes = wait_for(applied_everywhere, 60, interval=1.0, what="a set after the member left")
    assert sorted(c["replica"] for c in changes) == names
    assert not answers("127.0.0.1", int(urls[1].rsplit(":", 1)[1])), "no broker took its place"
    assert all(c["new"] == 0.07 for c in changes), changes
    ledger = run_loomrun("log", "--job", job, "--nats", urls[2], "--json")
    applied = [json.loads(line) for line in ledger.stdout.splitlines()]
    kept = {r["replica"] for r in applied if r["new"] == 0.05 and r["outcome"] == "applied"}
    assert kept == set(names), "the change made before the member left is still on record"
    listed = json.loads(run_loomrun("get", "--job", job, "--nats", urls[2], "--json").stdout)
    assert {
        p["replica"]: p["value"] for p in listed["params"] if p["name"] == "lr"
    } == dict.fromkeys(names, 0.07)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_started_before_its_cluster_has_a_quorum_gets_control_when_it_has(procs):
    """One member of three is up: JetStream refuses the job's state (no meta leader). The
    supervisor says so, trains on, and tries again; when the others join, steering works."""
    members, urls, member = start_members(procs, started=[0])
    # Listening first: on a silent loopback port the supervisor would start its own broker.
    wait_for(lambda: answers(*host_port(urls[0])), 30, what="member 0 listening")
    job = job_id("quorum")
    sup = procs.start(
        "--job", job, "--nats", urls[0], SCRIPTS / "steered.py", "--steps", "100000000",
        "--step-time", "0.01", "--quiet", env={"LOOMRUN_NATS_REPLICAS": "3"},
    )  # fmt: skip
    said: list[str] = []
    threading.Thread(target=lambda: said.extend(sup.stderr), daemon=True).start()
    wait_for(lambda: any("trying again" in line for line in said), 60, what="the first refusal")
    members += [member(1), member(2)]
    wait_ready(job, url=urls[0], timeout=120)

    # Through a member that just joined, the first tries may meet the cluster still electing
    # the buckets' leaders (a read that is not answered within 5 s); the next one works.
    def through_a_new_member():
        result = run_loomrun("set", "lr=0.0321", "--job", job, "--nats", urls[1], "--json")
        if "did not answer a read" in result.stderr:
            return None  # the election's symptom, and only it, is tried again
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)["changes"]

    changes = wait_for(through_a_new_member, 60, interval=1.0, what="a set through member 1")
    assert changes[0]["new"] == 0.0321
    assert not any("no live control" in line for line in said), said
