"""`loomrun log`: a job's change ledger (or, with --metrics, its metric history), from
the broker while its supervisors answer, else from the files they left."""

from __future__ import annotations

import contextlib
import time

import click

from loomrun.cli.options import (
    broker_first,
    broker_options,
    job_option,
    json_option,
    replica_option,
)


@click.command("log")
@job_option()
@replica_option()
@json_option(help="One JSON object per change, per line.")
@click.option("--follow", "-f", is_flag=True, help="Then print each new record as it comes.")
@click.option(
    "--metrics", is_flag=True,
    help="The metric history instead: per replica, a point per status (the script's metrics, "
    "lr, steps/s), at most 2048 evenly spread over the run.",
)  # fmt: skip
@broker_options
def log_command(job, replicas, as_json, follow, metrics, broker):
    """The change ledger of a job, oldest first: when, who, replica, old -> new, the step
    it took effect at, its kind (set, hold, unset) and what became of it (applied,
    rejected, overridden, missed, superseded). A change that the script's optimizer wrote
    over after it was applied has a second record, "overridden", of the same change.

    Works for running and finished jobs: a finished job by its id, read from the job's
    `changes.jsonl` (`metrics.json` with --metrics; and the other nodes' `.nodeK` files) in
    the state directory when the broker no longer has it.
    """
    if metrics:
        _log_metrics(job, replicas, as_json, follow, broker)
        return
    import json

    from loomrun.broker.state import state_dir
    from loomrun.client import Steering
    from loomrun.outcomes import sentence
    from loomrun.printable import printable
    from loomrun.records import job_dir, read_changes, record

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
        parts = item.get("parts") or ()
        if item["outcome"] == "overridden" and any(p.get("overridden") for p in parts):
            parts = [p for p in parts if p.get("overridden")]  # the others are in effect
        parts = [(p["name"], p["old"], p["new"]) for p in parts]
        said = sentence(
            item["name"], item["outcome"], old=item["old"], new=item["new"], step=item["step"],
            reason=item["reason"] or "", kind=item.get("kind", "set"), replica=item["replica"],
            parts=parts or None,
        )  # fmt: skip
        click.echo(printable(
            f"{stamp}  {item['replica']}  {item['outcome']:<10}  {said}  ({item['who'] or '?'})"
        ))  # fmt: skip

    async def from_broker() -> tuple[str, int]:
        async with Steering.connect(broker) as steering:
            name = (await steering.job(job)).job if job is None else job
            count = 0
            async for outcome in steering.ledger(name, follow):
                show(record(name, outcome))
                count += 1
            return name, count

    name, count = broker_first(job, from_broker, (job, 0))
    if count:
        return
    folder = job_dir(state_dir(), name)
    records = read_changes(folder)
    if records is None:
        path = folder / "changes.jsonl"
        raise click.UsageError(f"no change ledger for job {name!r} (nor {path})")
    for item in records:
        show(item)


def _log_metrics(job, replicas, as_json: bool, follow: bool, options) -> None:
    """`loomrun log --metrics`: the series from the supervisors, or the files they left."""
    import asyncio
    import json

    from loomrun import records
    from loomrun._proto import loomrun_pb2 as pb
    from loomrun.broker.state import state_dir
    from loomrun.client import Steering
    from loomrun.control import history
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
                for point in records.points(replica, found[replica]):
                    show(point)

    async def from_broker() -> tuple[str, bool]:
        async with Steering.connect(options) as steering:
            found = await steering.job(job)
            series = await steering.history(found.job, found.replicas)
            show_all({r: records.series_dict(s) for r, s in series.items()})
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

    name, answered = broker_first(job, from_broker, (job, False))
    if answered:
        return
    folder = records.job_dir(state_dir(), name)
    found = records.read_metrics(folder)
    if not found:
        raise click.UsageError(
            f"no metric history for job {name!r} (its supervisors do not answer, and "
            f"{folder / 'metrics.json'} does not exist)"
        )
    show_all(found)
