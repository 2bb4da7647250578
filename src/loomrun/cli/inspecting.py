"""The inspecting commands: get (parameters), schema (their docs), ls (jobs), watch
(replicas, live)."""

from __future__ import annotations

import sys

import click

from loomrun.cli.options import (
    Seconds,
    broker_options,
    job_option,
    json_option,
    replica_option,
    run_async,
    steer,
)


@click.command("get")
@job_option()
@replica_option()
@json_option()
@broker_options
def get_command(job, replicas, as_json, broker):
    """List each replica's parameters: type, bounds, doc, current value, last change."""
    import json

    from loomrun import tables
    from loomrun.client import parameters
    from loomrun.params import format_value

    async def gather(steering):
        found = await steering.job(job)
        targets = steering.targets(found, replicas)
        statuses = await steering.statuses(found.job)
        outcomes = await steering.outcomes(found.job)
        return (
            found.job,
            [(r, await steering.schema(found.job, r)) for r in targets],
            statuses,
            outcomes,
        )

    name, schemas, statuses, outcomes = steer(broker, gather)
    listing = []
    for replica, specs in schemas:
        status = statuses[replica].status if replica in statuses else None
        listing += parameters(replica, specs, status, outcomes)
    if as_json:
        click.echo(json.dumps({"job": name, "params": listing}))
        return
    rows = [
        [
            p["replica"], p["name"],
            format_value(p["value"]) + ("  held" if p["held"] else ""),
            f"script: {format_value(p['own'])}" if p["steered"] else "", p["type"], p["bounds"],
            f"step {p['changed_at_step']}" if p["changed_at_step"] is not None else "",
            p["doc"],
        ]
        for p in listing
    ]  # fmt: skip
    tables.render(
        ["replica", "param", "value", "steered", "type", "bounds", "changed", "doc"],
        rows,
        title=name,
    )


@click.command("schema")
@job_option()
@click.option(
    "--format", "form", type=click.Choice(["markdown", "json"]), default="markdown",
    show_default=True, help="A Markdown table, or one JSON Schema (draft 2020-12) document.",
)  # fmt: skip
@broker_options
def schema_command(job, form, broker):
    """Print the documentation of a job's parameters: each one's type, bounds or choices,
    default (the script's own value), the value in effect, its doc and the replicas that
    have it; a structured one field by field.

    \b
      loomrun schema --job train-1a2b3c > PARAMS.md
      loomrun schema --format json           one JSON Schema document, to validate against
    Works for running and finished jobs: a finished job's document is kept next to its
    change ledger (`schema.json` in its folder of the state directory).
    """
    import json

    from loomrun import paramdoc
    from loomrun.broker.state import state_dir
    from loomrun.cli.options import broker_first
    from loomrun.params import from_pb
    from loomrun.records import job_dir, read_schema

    async def from_broker():
        from loomrun.client import Steering

        async with Steering.connect(broker) as steering:
            found = await steering.job(job)
            schemas = await steering.schemas(found.job)
            statuses = await steering.statuses(found.job)
        values = {
            r: {n: from_pb(v) for n, v in statuses[r].status.values.items()}
            for r in schemas if r in statuses
        }  # fmt: skip
        specs = {r: s.specs for r, s in schemas.items()}
        return found.job, paramdoc.document(found.job, paramdoc.entries(specs, values))

    name, document = broker_first(job, from_broker, (job, None))
    if document is None:
        document = read_schema(job_dir(state_dir(), name))
        if document is None:
            raise click.UsageError(
                f"no parameters of job {name!r}: its supervisors do not answer, and "
                f"{job_dir(state_dir(), name) / 'schema.json'} does not exist"
            )
    if form == "json":
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(paramdoc.markdown(document), nl=False)


@click.command("ls")
@json_option()
@click.option("--all", "show_all", is_flag=True, help="Also jobs that ended over 10 minutes ago.")
@broker_options
def ls_command(as_json, show_all, broker):
    """List the jobs on the broker: state, host, replicas, start time, script.

    Running jobs, and those that ended (or were lost) in the last 10 minutes.
    """
    import json
    import time

    from loomrun import tables

    async def gather(steering):
        try:
            return await steering.jobs()
        except Exception as error:  # noqa: BLE001 - an empty broker has no buckets yet
            if "no loomrun job" in str(error):
                return []
            raise

    jobs = steer(broker, gather)
    if not show_all:
        recent = time.time() - 600
        jobs = [j for j in jobs if max(max(n.heartbeat, n.finished) for n in j.nodes) > recent]
    listing = [
        {
            "job": j.job,
            "state": j.state,
            "hosts": sorted({n.host for n in j.nodes}),
            "replicas": j.replicas,
            "started": min(n.started for n in j.nodes),
            "script": j.nodes[0].script,
            "nodes": len(j.nodes),
        }
        for j in jobs
    ]
    if as_json:
        click.echo(json.dumps({"jobs": listing}))
        return
    if not listing:
        click.echo("no loomrun job on this broker")
        return
    rows = [
        [
            j["job"], j["state"], ",".join(j["hosts"]), str(len(j["replicas"])),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["started"])), j["script"],
        ]
        for j in listing
    ]  # fmt: skip
    tables.render(["job", "state", "host", "replicas", "started", "script"], rows)


@click.command("watch")
@job_option(help="Only this job [default: every job].")
@replica_option()
@click.option("--once", is_flag=True, help="Print one snapshot and exit (1 if there is no job).")
@json_option(help="One JSON object per snapshot.")
@click.option(
    "--interval",
    type=Seconds(min=0.1),
    default=None,
    help="Seconds between frames [default: 0.25 on a terminal, 2 otherwise].",
)
@click.option(
    "--metrics",
    default=None,
    metavar="a,b",
    help="Metric columns [default: loss and the most common others, 3 in all].",
)
@broker_options
def watch_command(job, replicas, once, as_json, interval, metrics, broker):
    """Show every replica live: state, step, rate, metrics, lr, last change, GPU, restarts.

    A rich live table on a terminal; plain-text snapshots when piped. Closing it never
    affects the job.
    """
    from loomrun.watch import run_watch

    chosen = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    try:
        code = run_async(lambda: run_watch(broker, job, replicas, once, as_json, interval, chosen))
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)
