"""`loomrun watch`: every replica of every job, live.

Messages update a model as they arrive; the view is drawn from a snapshot of it on its own
clock (a few times a second at most), so 64 replicas updating quickly cost no more to draw
than 2. On a terminal the view is a rich Live table; elsewhere it is plain-text snapshots,
and `--json` prints each snapshot as one JSON object with the table's fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from loomrun import params as P
from loomrun import replica_table
from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.client import this_run
from loomrun.printable import printable

STALE_AFTER = 3.0  # seconds without a heartbeat from the replica's supervisor (every 1 s)
EVENTS_SHOWN = 8
EVENTS_SINCE = 600.0  # seconds of event history read at start
DEFAULT_METRICS = 3
DRAW_SHARE = 4.0  # wait at least this many times a frame's drawing time before the next
FINISHED_SHOWN = 60.0  # seconds a finished job stays in the view (unless named with --job)


def describe_state(status: pb.ReplicaStatus, age: float, job_lost: bool) -> str:
    if job_lost:
        return "lost"
    state = status.state
    if state == pb.EXITED:
        return f"exited {status.exit_code}"
    if state == pb.FAILED:
        code = status.exit_code
        if code > 128:
            with contextlib.suppress(ValueError):
                return f"failed: {signal.Signals(code - 128).name}"
        return f"failed: {code}"
    alive = (pb.RUNNING, pb.PAUSED, pb.STARTING, pb.HUNG, pb.REPLICA_STATE_UNSPECIFIED)
    if state in alive and age > STALE_AFTER:
        return "stale"
    if state == pb.REPLICA_STATE_UNSPECIFIED:
        return "starting"
    return pb.ReplicaState.Name(state).lower()


@dataclass
class WatchModel:
    """What the watcher knows: the latest status per replica, jobs, recent events."""

    jobs: dict[str, dict[int, pb.JobInfo]] = field(default_factory=dict)
    statuses: dict[tuple[str, str], pb.ReplicaStatus] = field(default_factory=dict)
    events: deque = field(default_factory=lambda: deque(maxlen=200))
    changes: dict[tuple[str, str], pb.Event] = field(default_factory=dict)
    updates: int = 0  # counts the messages taken: a view redraws only when it moved

    def take_status(self, key: str, data: bytes | None) -> None:
        self.updates += 1
        job, replica = S.split_job_key(key)
        if not data:
            self.statuses.pop((job, replica), None)
            return
        with contextlib.suppress(DecodeError):
            self.statuses[(job, replica)] = pb.ReplicaStatus.FromString(data)

    def take_job(self, key: str, data: bytes | None) -> None:
        self.updates += 1
        job, node = S.split_job_key(key)
        if not data:
            self.jobs.get(job, {}).pop(int(node[1:] or 0), None)
            if not self.jobs.get(job):
                self.jobs.pop(job, None)
            return
        with contextlib.suppress(DecodeError, ValueError):
            self.jobs.setdefault(job, {})[int(node[1:])] = pb.JobInfo.FromString(data)

    def take_event(self, data: bytes) -> None:
        self.updates += 1
        with contextlib.suppress(DecodeError):
            event = pb.Event.FromString(data)
            self.events.append(event)
            if event.kind in ("applied", "overridden"):
                self.changes[(event.job, event.replica)] = event

    def snapshot(
        self,
        now: float,
        job: str | None = None,
        replicas: list[str] | None = None,
        metrics: list[str] | None = None,
    ) -> dict[str, Any]:
        """Everything one frame shows, as plain data (the --json form)."""
        jobs, started_at = [], {}
        for name in sorted(self.jobs, key=lambda j: min(n.started for n in self.jobs[j].values())):
            if job is not None and name != job:
                continue
            nodes = this_run(list(self.jobs[name].values()))
            shown = {r for n in nodes for r in n.replicas if not replicas or r in replicas}
            finished = all(n.finished for n in nodes)
            if finished and job is None and now - max(n.finished for n in nodes) > FINISHED_SHOWN:
                continue
            heartbeat = max(n.heartbeat for n in nodes)
            lost = not finished and now - heartbeat > S.LOST_AFTER_SECONDS
            state = "lost" if lost else "running"
            if finished:
                code = max(n.exit_code for n in nodes)
                state = "exited 0" if code == 0 else f"failed: {code}"
            started = started_at[name] = min(n.started for n in nodes)
            rows = []
            for (job_name, replica), status in self.statuses.items():
                if job_name != name or replica not in shown:
                    continue
                rows.append(self._row(status, now, lost, started))
            rows.sort(key=lambda r: S.replica_order(r["replica"]))
            jobs.append(
                {
                    "job": name,
                    "script": nodes[0].script,
                    "broker": nodes[0].broker,
                    "hosts": sorted({n.host for n in nodes}),
                    "state": state,
                    "uptime": round(now - started, 1),
                    "replicas": rows,
                    "totals": {
                        "replicas": len(rows),
                        "running": sum(r["state"] == "running" for r in rows),
                        "steps_per_sec": round(sum(r["steps_per_sec"] for r in rows), 2),
                    },
                }
            )
        # A job id run before: its events of that run stay out (this run's "started" comes
        # after its start, which is when its first supervisor began).
        events = [
            {
                "time": e.time,
                "job": e.job,
                "replica": e.replica,
                "kind": e.kind,
                "text": e.text,
            }
            for e in reversed(self.events)
            if e.job in started_at
            and e.time >= started_at[e.job]
            and (not replicas or e.replica in replicas)
        ][:EVENTS_SHOWN]
        shown = metrics or _common_metrics(jobs)
        return {"time": now, "jobs": jobs, "events": events, "metrics": shown}

    def _row(
        self, status: pb.ReplicaStatus, now: float, lost: bool, started: float
    ) -> dict[str, Any]:
        worker = status.status
        change = self.changes.get((status.job, status.replica))
        age = max(0.0, now - status.time)
        values = {k: P.from_pb(v) for k, v in worker.values.items()}
        return {
            "replica": status.replica,
            "host": status.host,
            "device": status.device_name or "-",
            "device_uuid": status.device_uuid,
            "state": describe_state(status, age, lost),
            "step": worker.step,
            "steps_per_sec": round(worker.steps_per_sec, 2),
            "metrics": {k: P.json_float(v) for k, v in worker.metrics.items()},
            "lr": values.get("lr"),
            "values": values,
            "held": sorted(worker.held),
            "last_change": change.text if change is not None and change.time >= started else None,
            "gpu_util": status.gpu_util if status.device_uuid.startswith(("GPU", "MIG")) else None,
            "gpu_mem_used": status.gpu_mem_used or None,
            "gpu_mem_total": status.gpu_mem_total or None,
            "restarts": status.restarts,
            "exit_code": status.exit_code,
            "age": round(age, 2),
            "pid": status.pid,
        }


def _common_metrics(jobs: list[dict]) -> list[str]:
    seen: dict[str, int] = {}
    for job in jobs:
        for row in job["replicas"]:
            for name in row["metrics"]:
                seen[name] = seen.get(name, 0) + 1
    ordered = sorted(seen, key=lambda n: (n != "loss", -seen[n], n))
    return ordered[:DEFAULT_METRICS]


# -- drawing ----------------------------------------------------------------------------


def _header(job: dict) -> str:
    """What matters first, so a narrow screen cuts only the end."""
    totals = job["totals"]
    hosts = job["hosts"]
    where = f"host {hosts[0]}" if len(hosts) == 1 else f"{len(hosts)} hosts"
    rate, uptime = replica_table.rate(totals["steps_per_sec"]), replica_table.age(job["uptime"])
    return printable(
        f"{job['job']}  {job['state']}  {totals['running']}/{totals['replicas']} running  "
        f"{rate} steps/s  up {uptime}  {where}  {job['script']}  broker {job['broker']}"
    )


def _event_line(event: dict) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    line = f"{stamp}  {event['job']}/{event['replica']}  {event['kind']}: {event['text']}"
    return printable(line)


def render_plain(snapshot: dict) -> str:
    """Every column, for a file or a pipe: no control codes, nothing cut."""
    if not snapshot["jobs"]:
        return "no loomrun job is running (waiting for one)"
    blocks = []
    for job in snapshot["jobs"]:
        table = replica_table.fit(job["replicas"], snapshot["metrics"], None)
        blocks.append("\n".join([_header(job), *table.lines()]))
    if snapshot["events"]:
        blocks.append("events (newest first):\n" + "\n".join(map(_event_line, snapshot["events"])))
    return "\n\n".join(blocks)


_STATE_STYLES = {
    "running": "green", "paused": "yellow", "stale": "bold red", "lost": "bold red",
    "hung": "bold red",
}  # fmt: skip


def render_rich(snapshot: dict, width: int):
    """The live view for a screen `width` characters wide: one line per replica, the
    columns fitted (replica_table). Lines of text, not a rich Table: a 64-replica frame
    is drawn in a few milliseconds (benchmarks/watch_render.py)."""
    from rich.console import Group
    from rich.text import Text

    def line(text: str, style: str = "") -> Text:
        return Text(text, style=style, no_wrap=True, overflow="ellipsis", end="\n")

    if not snapshot["jobs"]:
        return Text("no loomrun job is running (waiting for one)", style="dim")
    parts = []
    for job in snapshot["jobs"]:
        table = replica_table.fit(job["replicas"], snapshot["metrics"], width)
        header, *rows = table.lines()
        parts.append(line(_header(job), "bold"))
        parts.append(line(header.ljust(min(width, len(header))), "reverse"))
        state = table.headers.index("state")
        start = sum(table.widths[:state]) + replica_table.GAP * state
        for text, cells in zip(rows, table.rows, strict=True):
            row = line(text)
            shown = cells[state]
            style = _STATE_STYLES.get(shown, "red" if shown.startswith("failed") else "")
            if style:
                row.stylize(style, start, start + len(shown))
            parts.append(row)
        parts.append(line(""))
    if snapshot["events"]:
        parts.append(line("events (newest first)", "bold"))
        parts.extend(line(_event_line(e)) for e in snapshot["events"])
    return Group(*parts)


# -- the loop -------------------------------------------------------------------------------


async def feed(steering, model: WatchModel, job: str | None, ready: asyncio.Event) -> list:
    """Start the watchers that keep `model` current; `ready` is set once the initial state is in."""
    from nats.js import api

    status_kv, jobs_kv = await steering.kv(S.STATUS), await steering.kv(S.JOBS)
    pattern = S.job_keys(job)
    tasks = []
    initial = []
    for bucket, kv, take in (
        (S.STATUS, status_kv, model.take_status),
        (S.JOBS, jobs_kv, model.take_job),
    ):
        # The snapshot first, read to the server's own count (see Steering.entries); the
        # watch then keeps the model current.
        for key, data in (await steering.entries(bucket, pattern)).items():
            take(key, data)
        watcher = await kv.watch(pattern)

        async def pump(watcher=watcher, take=take):
            async for entry in watcher:
                if entry is not None:
                    deleted = entry.operation in ("DEL", "PURGE")
                    take(entry.key, None if deleted else entry.value)

        tasks.append(asyncio.ensure_future(pump()))
    since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=EVENTS_SINCE)
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=since
    )

    events_in = asyncio.Event()
    initial.append(events_in)

    async def take_event(msg) -> None:
        model.take_event(msg.data)
        if msg.metadata.num_pending == 0:
            events_in.set()  # caught up with the recent events

    try:
        subscription = await steering.js.subscribe(
            S.events(job or "*", ">"), ordered_consumer=True, config=config, cb=take_event
        )
        info = await subscription.consumer_info()
        if info.num_pending == 0 and not info.delivered.consumer_seq:
            events_in.set()  # no recent events at all
    except Exception:  # noqa: BLE001 - no events stream yet: no events to show
        events_in.set()

    async def all_in():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(d.wait() for d in initial)), 2.0)
        ready.set()

    tasks.append(asyncio.ensure_future(all_in()))
    return tasks


async def run_watch(
    options,
    job: str | None,
    replicas: list[str] | None,
    once: bool,
    as_json: bool,
    interval: float,
    metrics: list[str] | None,
) -> int:
    from loomrun.client import SteerError, Steering

    model = WatchModel()
    async with Steering.connect(options) as steering:
        while True:
            try:
                await steering.kv(S.JOBS)
                await steering.kv(S.STATUS)
                break
            except SteerError:
                if once:
                    print("no loomrun job on this broker", file=sys.stderr)
                    return 1
                if sys.stdout.isatty() or not as_json:
                    print("no loomrun job on this broker yet; waiting for one", file=sys.stderr)
                await asyncio.sleep(2.0)
        ready = asyncio.Event()
        tasks = await feed(steering, model, job, ready)
        try:
            await ready.wait()
            if once:
                snap = model.snapshot(time.time(), job, replicas, metrics)
                if not snap["jobs"]:
                    known = f"no job {job!r} on this broker" if job else "no loomrun job is running"
                    print(known, file=sys.stderr)
                    return 1
                if replicas and not any(j["replicas"] for j in snap["jobs"]):
                    where = f"job {job}" if job else "any job shown"
                    print(f"{where} has no replica {', '.join(replicas)}", file=sys.stderr)
                    return 1
                print(json.dumps(snap) if as_json else render_plain(snap))
                return 0
            if sys.stdout.isatty() and not as_json:
                await _live(model, job, replicas, metrics, interval or 0.25)
            else:
                interval = interval or 2.0
                while True:
                    snap = model.snapshot(time.time(), job, replicas, metrics)
                    print(json.dumps(snap) if as_json else render_plain(snap) + "\n", flush=True)
                    await asyncio.sleep(interval)
        finally:
            for task in tasks:
                task.cancel()
    return 0


async def _live(model, job, replicas, metrics, interval) -> None:
    from rich.live import Live

    refresh = max(interval, 0.1)  # drawn on this clock, whatever the message rate
    with Live(auto_refresh=False, screen=False, transient=False) as live:
        while True:
            started = time.perf_counter()
            snapshot = model.snapshot(time.time(), job, replicas, metrics)
            live.update(render_rich(snapshot, live.console.width))
            live.refresh()
            cost = time.perf_counter() - started
            # A big table draws less often: drawing takes at most a quarter of a core.
            await asyncio.sleep(max(refresh, DRAW_SHARE * cost))
