"""Runs of tests/scripts/spiky.py (a seeded regression whose data turns bad for a few
steps) and what they printed: the snapshot and the rule tests share them."""

from __future__ import annotations

import re

from conftest import SCRIPTS, run_loomrun, wait_for
from jobs import cli_json, job_id, one_step

SPIKY = SCRIPTS / "spiky.py"


def run_to_file(procs, tmp_path, name, *args, replicas=1, extra=(), env=None):
    out = tmp_path / f"{name}.out"
    job = job_id(name)
    with out.open("w") as sink:
        sup = procs.start(
            "--replicas", replicas, "--job", job, *extra, SPIKY, *args, stdout=sink, env=env
        )  # fmt: skip
    return job, sup, out


def hashes(text: str, replica: str = "r0", of: str = "hash") -> dict[int, str]:
    """Per step, what spiky.py printed of it: the hash of the state_dict (`hash`), of the
    parameters (`params`), its loss (`loss`), the param group's lr (`lr`), the scheduler's
    count (`sched`)."""
    pattern = rf"^\[{replica}\] step (\d+) hash (\w+) params (\w+) loss (\S+) lr (\S+) sched (\d+)"
    column = {"hash": 2, "params": 3, "loss": 4, "lr": 5, "sched": 6}[of]
    return {int(m[1]): m[column] for m in re.finditer(pattern, text, re.M)}


def final(text: str, replica: str = "r0") -> tuple[float, str, str]:
    """The run's last loss (a mean of 20 steps), the hash of its state_dict, of its
    parameters."""
    found = re.search(rf"^(?:\[{replica}\] )?final (\S+) hash (\w+) params (\w+)$", text, re.M)
    assert found, text[-2000:]
    return float(found[1]), found[2], found[3]


def at_least(out, step: int, replicas=("r0",), timeout=120) -> None:
    wait_for(
        lambda: all(max(hashes(out.read_text(), r), default=0) >= step for r in replicas),
        timeout,
        what=f"step {step}",
    )


def stop(job: str, sup) -> int:
    code, stopped = cli_json("set", "stop=true", "--job", job)
    assert code == 0, stopped
    sup.wait(timeout=300)
    assert sup.returncode == 0
    return one_step(stopped)


def reference(steps: int, bad_for: int, replicas: int = 1, bad_from: int = 60) -> float:
    """The same seeded run, unsteered, for `steps` steps."""
    result = run_loomrun(
        "--replicas", replicas, "--no-broker", "--job", job_id("reference"), SPIKY,
        "--iters", steps, "--bad-for", bad_for, "--bad-from", bad_from, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return final(result.stdout)[0]
