"""64 replicas under one supervisor, torch-free, each stepping and reporting: one `set`
reaches all of them, and every one shows live. (benchmarks/scale.py measures the
supervisor's CPU, status freshness and the `set` fan-out time.)"""

from __future__ import annotations

import json

import pytest
from conftest import SCRIPTS, run_loomrun, wait_for
from jobs import job_id, start, wait_ready

REPLICAS = 64


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_64_replicas_on_one_supervisor(procs):
    job = job_id("scale")
    names = [f"r{i}" for i in range(REPLICAS)]
    start(procs, SCRIPTS / "no_torch.py", "--forever", job=job, replicas=REPLICAS)
    wait_ready(job, names, name="scale", timeout=300)

    result = run_loomrun("set", "scale=0.5", "--job", job, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads(result.stdout)
    assert answer["result"] == "applied"
    assert sorted(c["replica"] for c in answer["changes"]) == sorted(names)
    assert len({c["change_id"] for c in answer["changes"]}) == 1, "one change, every replica"
    assert all(c["old"] == 1.0 and c["new"] == 0.5 and c["step"] > 0 for c in answer["changes"])

    def all_live():
        shown = json.loads(run_loomrun("watch", "--once", "--json", "--job", job).stdout)
        rows = shown["jobs"][0]["replicas"]
        fine = len(rows) == REPLICAS and all(
            r["state"] == "running" and "loss" in r["metrics"] for r in rows
        )
        return rows if fine else None

    rows = wait_for(all_live, 60, interval=0.5, what="every replica running, with a loss")
    assert {r["replica"] for r in rows} == set(names)
    listed = json.loads(run_loomrun("get", "--job", job, "--json").stdout)["params"]
    assert {p["replica"] for p in listed if p["name"] == "scale" and p["value"] == 0.5} == set(
        names
    )
    (mine,) = [j for j in json.loads(run_loomrun("ls", "--json").stdout)["jobs"] if j["job"] == job]
    assert len(mine["replicas"]) == REPLICAS
