"""A broker outage under a flood: 4 clients make 2,000 changes to a job of 2 replicas, and
the bundled broker is SIGKILLed at a random moment of it. The job's supervisor starts the
broker again (its store on disk: the desired values and the ledger come back); the
clients reconnect and go on.

Then every answer a client got from the job is in the change ledger, on disk and in the
broker, exactly once, keyed by (replica, change id, outcome); the two copies hold the
same records; and what each replica has in effect is what the ledger's last `applied`
record for that parameter says, counting the changes whose `set` the outage broke and
which still reached the job."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from leftovers import fresh_state, kill_left, leftovers, wait_clean
from trials import trials

from loomrun import params as P
from loomrun import subjects as S
from loomrun.broker.connect import BrokerOptions, answers, host_port
from loomrun.client import SteerError, Steering

HERE = Path(__file__).resolve().parent
SCRIPT = HERE.parent / "scripts" / "steered.py"
CLIENTS, CALLS = 4, 500
REPLICAS = ("r0", "r1")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """(state, env, folder, supervisors): a failed trial's supervisors are stopped as a
    user would, so that the next trial starts clean."""
    state, _, env = fresh_state(tmp_path)
    monkeypatch.setenv("XDG_STATE_HOME", str(state))  # this test's clients: the broker's token
    started: list[subprocess.Popen] = []
    yield state, env, tmp_path, started
    for sup in started:
        if sup.poll() is None:
            sup.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                sup.communicate(timeout=60)
    kill_left(state)


def steer(url: str, work):
    async def session():
        async with Steering.connect(BrokerOptions(url), timeout=10) as s:
            return await work(s)

    return asyncio.run(session())


def until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Wait for `predicate()` to be true (its value), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        found = predicate()
        if found:
            return found
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(interval)


def ready(url: str, job: str) -> bool:
    async def look(s):
        try:
            return all(["batch" in await s.schema(job, r) for r in REPLICAS])
        except SteerError:
            return False

    try:
        return steer(url, look)
    except Exception:  # noqa: BLE001 - the broker is not up yet
        return False


def broker_copy(url: str, job: str) -> list[tuple[dict, str]]:
    """The job's ledger as the broker keeps it, read raw (no reader's dedup): each
    record with its message id."""
    from nats.js import api

    from loomrun._proto import loomrun_pb2 as pb
    from loomrun.records import record

    async def read(s):
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
        sub = await s.js.subscribe(
            S.ledger(job, "*"), stream=S.LEDGER_STREAM, ordered_consumer=True, config=config
        )
        found = []
        try:
            info = await sub.consumer_info()
            if info.num_pending == 0:
                return found
            async for msg in sub.messages:
                outcome = pb.Outcome.FromString(msg.data)
                found.append((record(job, outcome), (msg.headers or {}).get("Nats-Msg-Id", "")))
                if msg.metadata.num_pending == 0:
                    return found
        finally:
            await sub.unsubscribe()

    return steer(url, read)


def disk_copy(state: Path, job: str) -> list[dict]:
    path = state / "loomrun" / "jobs" / job / "changes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def key(record: dict) -> tuple[str, str, str, bool]:
    """(replica, change id, outcome): an ending `overridden` is an outcome of its own."""
    return (record["replica"], record["change_id"], record["outcome"], record["ended"])


def last_applied(records: list[dict]) -> dict[tuple[str, str], object]:
    """What the ledger says is in effect: per replica and parameter, the value of its last
    `applied` record (records of one replica are in the order it answered)."""
    found = {}
    for r in records:
        if r["outcome"] == "applied":
            found[(r["replica"], r["name"])] = r["new"]
    return found


def in_effect(url: str, job: str) -> dict[tuple[str, str], object]:
    async def read(s):
        statuses = await s.statuses(job)
        return {
            (r, name): P.from_pb(value)
            for r, status in statuses.items()
            for name, value in status.status.values.items()
        }

    return steer(url, read)


def answered(results: list[dict]) -> list[dict]:
    """The answers a client got from the job itself (not deduced, not timed out)."""
    return [
        r for r in results if "error" not in r and not r["deduced"] and r["state"] != "timed out"
    ]


def lost_answers(results: list[dict], records: list[dict]) -> list[str]:
    """The answers a client got that these records lack."""
    keys = {key(r)[:3] for r in records}
    return [
        f"not in the ledger: {k}"
        for r in answered(results)
        if (k := (r["replica"], r["change_id"], r["state"])) not in keys
    ]


def doubled(disk: list[dict], broker: list[tuple[dict, str]]) -> list[str]:
    """Records held twice, under two message ids or none, or not in the same order in the
    two copies (the broker's takes them one at a time, in order)."""
    found = []
    for where, keys in (("disk", [key(r) for r in disk]), ("broker", [key(r) for r, _ in broker])):
        found += [f"{n} times on the {where}: {k}" for k, n in Counter(keys).items() if n > 1]
    ids = Counter(msg_id for _, msg_id in broker)
    found += [f"message id {i!r} on {n} records" for i, n in ids.items() if n > 1 or not i]
    if [key(r) for r in disk] != [key(r) for r, _ in broker]:
        found.append("the disk's and the broker's copies differ, or differ in order")
    return found


def _broker_pid(state: Path) -> int | None:
    for record in (state / "loomrun").glob("broker-*.pid"):
        try:
            return int(record.read_text())
        except (OSError, ValueError):
            continue
    return None


def _results(outs: list[Path]) -> list[dict]:
    """The clients' results so far: whole lines only (a client may be writing one)."""
    lines = []
    for out in outs:
        if out.exists():
            whole = out.read_text().rpartition("\n")[0]
            lines += [json.loads(line) for line in whole.splitlines() if line]
    return lines


def desired(url: str, job: str) -> dict[tuple[str, str], object]:
    """What the broker holds as wanted, per replica and parameter: the last change written."""
    from loomrun._proto import loomrun_pb2 as pb

    async def read(s):
        found = {}
        for key, data in (await s.entries(S.DESIRED, S.job_keys(job))).items():
            replica, _, name = S.split_desired(key)
            found[(replica, name)] = P.from_pb(pb.DesiredParam.FromString(data).value)
        return found

    return steer(url, read)


def applied_later(results: list[dict], disk: list[dict]) -> int:
    """Calls the outage broke whose change still reached the job and was applied (their
    values are their own, so the ledger names them)."""
    applied = {(r["replica"], r["name"], r["new"]) for r in disk if r["outcome"] == "applied"}
    return sum((r["replica"], r["name"], r["value"]) in applied for r in results if "error" in r)


@pytest.mark.timeout(600)
@pytest.mark.kind("flood", "the broker SIGKILLed in a flood of 2,000 sets from 4 clients")
@pytest.mark.parametrize("number", trials(10))
def test_a_broker_killed_in_a_flood_loses_no_answer(number, trial, fresh):
    state, env, tmp, started = fresh
    url = env["LOOMRUN_NATS"]
    job = f"flood-{secrets.token_hex(3)}"
    sup = subprocess.Popen(
        [sys.executable, "-m", "loomrun.cli", "--replicas", "2", "--job", job, SCRIPT,
         "--steps", "100000000", "--step-time", "0.005", "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=(tmp / "supervisor.err").open("w"),
        start_new_session=True,
    )  # fmt: skip
    started.append(sup)
    until(lambda: ready(url, job), 120, "both replicas to declare their parameters", 0.5)
    outs = [tmp / f"client{c}.jsonl" for c in range(CLIENTS)]
    clients = [
        subprocess.Popen(
            [sys.executable, HERE / "flood_client.py", job, url, str(c), str(CALLS), out],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for c, out in enumerate(outs)
    ]
    started += clients
    at = random.Random(number).randint(CALLS // 5, CALLS * CLIENTS * 3 // 5)
    until(lambda: len(_results(outs)) >= at or any(c.poll() is not None for c in clients),
          120, f"{at} answers", 0.02)  # fmt: skip
    pid = _broker_pid(state)
    assert pid is not None, "no broker pid record"
    os.kill(pid, signal.SIGKILL)
    killed, killed_at = time.monotonic(), len(_results(outs))
    until(lambda: _broker_pid(state) not in (None, pid) and answers(*host_port(url)), 60,
          "the job to start the broker again", 0.02)  # fmt: skip
    back = time.monotonic() - killed
    for c in clients:
        _, err = c.communicate(timeout=400)
        assert c.returncode == 0, err[-2000:]
    results = _results(outs)
    assert len(results) == CLIENTS * CALLS

    # The job settles: both copies of the ledger hold the same records, and each replica
    # has in effect what the ledger's last applied record says, and what the broker holds
    # as the last change wanted (every value here is within bounds: none is refused).
    def settled():
        disk = disk_copy(state, job)
        try:
            broker, effect = broker_copy(url, job), in_effect(url, job)
            wanted = desired(url, job)
        except Exception:  # noqa: BLE001 - the broker still coming back
            return None
        same = [key(r) for r in disk] == [key(r) for r, _ in broker]
        agree = last_applied(disk) == wanted == {k: effect.get(k) for k in wanted}
        return (disk, broker, effect, wanted) if same and agree else None

    try:
        disk, broker, effect, wanted = until(settled, 90, "the copies and replicas to agree", 0.5)
    except AssertionError:
        disk, broker = disk_copy(state, job), broker_copy(url, job)
        effect, wanted = in_effect(url, job), desired(url, job)
    missing = lost_answers(results, disk) + lost_answers(results, [r for r, _ in broker])
    trial.lost = len(missing)
    found = missing + doubled(disk, broker)
    broke = [r for r in results if "error" in r]
    timed_out = sum(r.get("state") == "timed out" for r in results)
    late = applied_later(results, disk)
    trial.moment = (f"trial {number}: broker killed after {killed_at} of {CLIENTS * CALLS} "
                    f"answers, back in {back:.1f} s; {len(broke)} calls broke ({late} of "
                    f"them applied all the same), {timed_out} timed out; "
                    f"{len(disk)} ledger records")  # fmt: skip
    errors = sorted({r["error"] for r in broke})
    stop(trial, sup, state, job)
    assert not found, found[:10]
    assert last_applied(disk) == wanted, "the last applied is the last wanted"
    assert {k: effect.get(k) for k in wanted} == wanted, "in effect: the last wanted"
    assert all("broker" in e and "\n" not in e for e in errors), errors  # one line, naming it


def stop(trial, sup: subprocess.Popen, state: Path, job: str) -> None:
    """Stop the job as a user would (SIGTERM); its cleanup time is the trial's figure."""
    stopped = time.monotonic()
    sup.send_signal(signal.SIGTERM)
    sup.wait(timeout=120)
    err = (state.parent / "supervisor.err").read_text()
    try:
        wait_clean(state, [job])
    except AssertionError:
        trial.left = leftovers(state, [job])
        raise
    finally:
        trial.cleanup = time.monotonic() - stopped
    assert sup.returncode == 143, err[-2000:]
    assert "may be missing from the broker's copy" not in err, err[-2000:]
