"""The steering commands: set, unset, pause, resume. Each writes one change, waits for
every replica's answer to it, prints one line per answer and exits with what they mean."""

from __future__ import annotations

import sys

import click

from loomrun.cli.options import (
    EXIT_REJECTED,
    EXIT_TIMED_OUT,
    Seconds,
    broker_options,
    job_option,
    json_option,
    replica_option,
    steer,
)


def _dotted(name: str) -> str:
    """Why `sched.warmup` is not a name: a field goes by its path, with `/`."""
    base, dot, rest = name.partition(".")
    if dot and rest and not rest.isdigit() and "/" not in name:
        return (
            f"; a field of a structured parameter goes by its path with '/' "
            f"({base}/{rest.replace('.', '/')}), and only lr.N has a dot"
        )
    return ""


def _parse_assignments(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    from loomrun.subjects import is_key

    changes: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not is_key(name):
            raise click.BadParameter(
                f"'{item}' is not KEY=VALUE (like lr=0.002, or sched/warmup=200 for a "
                f"field){_dotted(name)}"
            )
        changes[name] = value
    return changes


def steering_options(f):
    """--job, --replica, --at-step, --force, --timeout, --no-wait, --json and the broker."""
    f = json_option()(f)
    f = click.option("--no-wait", is_flag=True, help="Write the change and return at once.")(f)
    f = click.option(
        "--timeout",
        type=Seconds(min=0),
        default=30.0,
        show_default=True,
        help="Seconds to wait for every replica's answer.",
    )(f)
    f = click.option(
        "--force",
        is_flag=True,
        help="Change only some ranks of a process group, although they will then differ.",
    )(f)
    f = click.option(
        "--at-step",
        type=click.IntRange(1, 2**63 - 1),
        default=None,
        help="Apply at exactly this step number, or nowhere if a replica is past it "
        "[default: at once; ranks of a process group: at one step they agree on].",
    )(f)
    f = replica_option("Only these replicas [default: all of the job's].")(f)
    f = job_option()(f)
    return broker_options(f)


def report(results, as_json: bool, job: str | None, waited: bool) -> int:
    """Print what became of each change, each line from that change's own answer; return
    the exit code it means."""
    import json

    from loomrun import client
    from loomrun.params import format_value
    from loomrun.printable import printable

    def say(line: str) -> None:
        click.echo(printable(line))  # names, values and reasons come from the broker

    summary = client.summary(results) if waited else "written"
    code = {"written": 0, "applied": 0, "timed out": EXIT_TIMED_OUT}.get(summary, EXIT_REJECTED)
    if as_json:
        found = results[0].job if results else job
        changes = [r.as_dict() for r in results]
        click.echo(json.dumps({"job": found, "result": summary, "changes": changes}))
        return code
    for r in results:
        if not waited:
            asked = r.together or {r.name: r.requested}
            shown = "  ".join(f"{name} = {format_value(value)}" for name, value in asked.items())
            say(f"{r.replica}  {shown}  written (change {r.change_id})")
            continue
        line = f"{r.replica}  {r.sentence()}"
        if r.state == "applied" and r.latency is not None:
            line += f"  ({r.latency * 1000:.1f} ms)"
        say(line)
    return code


EXIT_CODES = (
    "Exit codes: 0 applied; 1 not applied or not in effect (rejected, overridden by the "
    "script's optimizer, missed its step, replaced by a later change, or the replica is not "
    "running); 3 timed out; 2 usage; 4 no broker."
)


@click.command("set", epilog=EXIT_CODES)
@click.argument(
    "assignments", nargs=-1, required=True, callback=_parse_assignments, metavar="KEY=VALUE..."
)
@click.option(
    "--hold",
    is_flag=True,
    help="Keep lr (lr.N) at exactly this value whatever the script's schedule says, until "
    "the next change or unset [default: the schedule times new/old].",
)
@steering_options
def set_command(
    assignments, hold, job, replicas, at_step, force, timeout, no_wait, as_json, broker
):
    """Change parameters of a running job, between two steps.

    \b
      loomrun set lr=0.002                   every replica of the only running job
      loomrun set lr=1e-3 momentum=0.8 --replica r1 --job train-1a2b3c
      loomrun set lr.1=1e-4                  only the second param group's lr
      loomrun set lr=3e-4 --hold             stop the decay here
      loomrun set sched/warmup=200           one field of a dataclass parameter
      loomrun set sched='{"warmup": 200, "peak": 0.003}'   all of it, as JSON
    Values are checked against the schema the replicas published before anything is
    sent; then `set` waits until every replica answered this very change: applied (at
    which step, old -> new), rejected, overridden, or missed. A change stays in effect
    until the next change or `unset`, whatever the script writes: under a schedule, lr
    is the schedule times new/old (`--hold`: exactly the value); momentum, weight_decay
    and betas are held exactly. `lr` keeps the param groups' ratios. A field goes by
    its path (`sched/warmup`, `blocks/0/width`; a key's `/` written `~1`), applied to the
    value in effect; fields of one `set` are one change. An optimizer that
    writes lr inside its own step cannot be steered: that answer is "overridden", and it
    comes after the step the change ran in. Independent replicas apply it at once; the
    ranks of a process group all at one step.
    """
    if hold:  # said before the broker is asked anything
        from loomrun.client import SteerError
        from loomrun.client.checks import check_hold

        try:
            check_hold(assignments)
        except SteerError as error:
            raise click.UsageError(str(error)) from None
    run_change(
        broker, job, no_wait, as_json,
        lambda s: s.set(job, assignments, replicas, at_step, timeout, not no_wait, force, hold),
    )  # fmt: skip


def run_change(broker, job, no_wait: bool, as_json: bool, work) -> None:
    """Run one change (set, unset, pause, resume); exit with the code its answers mean."""
    results = steer(broker, work)
    sys.exit(report(results, as_json, job, not no_wait))


@click.command("unset", epilog=EXIT_CODES)
@click.argument("names", nargs=-1, required=True, metavar="KEY...")
@job_option()
@replica_option()
@click.option("--force", is_flag=True, help="Only some ranks of a process group, though.")
@click.option("--timeout", type=Seconds(min=0), default=30.0, show_default=True)
@click.option("--no-wait", is_flag=True, help="Write the change and return at once.")
@json_option()
@broker_options
def unset_command(names, job, replicas, force, timeout, no_wait, as_json, broker):
    """Give parameters back to the script.

    \b
      loomrun unset lr                       every replica's lr, as the script's schedule says
      loomrun unset sched/warmup             one field, back to the script's default
    An optimizer's value (lr, momentum, ...) is again what the script computes, from the
    step the unset lands at, unscaled; a declared parameter goes back to its default. The
    same checks and answers as `set`; `get` shows which parameters loomrun steers.
    """
    from loomrun.subjects import is_key

    for name in names:
        if not is_key(name):
            raise click.BadParameter(
                f"'{name}' is not a parameter name, nor a field's path{_dotted(name)}",
                param_hint="KEY",
            )
    unique = list(dict.fromkeys(names))
    run_change(
        broker, job, no_wait, as_json,
        lambda s: s.unset(job, unique, replicas, timeout, not no_wait, force),
    )  # fmt: skip


def _pause_or_resume(paused, job, replicas, at_step, force, timeout, no_wait, as_json, broker):
    run_change(
        broker, job, no_wait, as_json,
        lambda s: s.pause(job, paused, replicas, at_step, timeout, not no_wait, force),
    )  # fmt: skip


@click.command("pause", epilog=EXIT_CODES)
@steering_options
def pause_command(**kwargs):
    """Pause replicas between two steps (every replica by default; the ranks of a process
    group at one step they agree on)."""
    _pause_or_resume(True, **kwargs)


@click.command("resume", epilog=EXIT_CODES)
@steering_options
def resume_command(**kwargs):
    """Resume paused replicas."""
    _pause_or_resume(False, **kwargs)
