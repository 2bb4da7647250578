"""rule add, rule ls, rule rm: rules that steer a running job by themselves."""

from __future__ import annotations

import click

from loomrun.cli.options import broker_options, job_option, json_option, replica_option, steer

RULE_CODES = (
    "Exit codes: 0 done; 2 usage (a rule that does not parse, an unknown rule); 4 no broker."
)


def _rule_name(ctx, param, value: str) -> str:
    from loomrun.subjects import RULE_NAME

    if not RULE_NAME.fullmatch(value):
        raise click.BadParameter(
            f"{value!r} is not a rule name (expected letters, digits, _ and -, at most 64, "
            "starting with a letter or digit)"
        )
    return value


@click.group("rule")
def rule_group():
    """Rules that steer a running job by themselves: when a condition on the reported
    metrics is met, the job's replicas get the rule's changes.

    \b
      loomrun rule add spike --when "loss > 3 * ema(loss, 20)" \\
                             --then "rollback; set lr=lr*0.5" --cooldown 300
      loomrun rule ls
      loomrun rule rm spike
    """


@rule_group.command("add", epilog=RULE_CODES)
@click.argument("name", callback=_rule_name)
@click.option("--when", required=True, metavar="CONDITION", help="When the rule fires.")
@click.option("--then", required=True, metavar="ACTIONS", help="What it does, `;`-separated.")
@click.option(
    "--cooldown",
    type=click.IntRange(0, 2**62),
    default=0,
    metavar="STEPS",
    help="Steps after a firing before it may fire again [default: 0].",
)
@click.option(
    "--across",
    type=click.Choice(["max", "min", "mean"]),
    default="max",
    help="A process group's value, from its ranks' [default: max].",
)
@replica_option("Read and steer only these replicas (a group's rank: the whole group).")
@job_option()
@json_option()
@broker_options
def add_command(name, when, then, cooldown, across, replicas, job, as_json, broker):
    """Add (or replace) rule NAME: when CONDITION is met, do ACTIONS.

    \b
    CONDITION compares numbers, metrics and functions, joined with and, or, not:
      loss                   a metric's last value at a status (the supervisor reads
                             about ten a second); loss.mean, loss.min, loss.max: over
                             the steps since the status before (a spike of a few fast
                             steps shows in loss.max)
      ema(loss, 20)          also mean, min, max: over the 20 status points before
                             this one (not met until there are 20)
      + - * / ( )            arithmetic; > >= < <= == != compare
    ACTIONS, `;`-separated, each done as its command would be, on the unit that met the
    condition (a replica; every rank of a process group, at one step they agree on):
      set lr=0.001 wd=0.1    set lr=lr*0.5 (also / + -): on the value in effect at the
                             step the change lands
      unset lr   pause   resume   snapshot [NAME]   save DIR
      rollback [NAME]        without NAME: the newest snapshot taken before the
                             status window that met the condition
    A rule fires again once its changes were all answered, and --cooldown steps after.
    Each firing is a ledger record (`loomrun log`), with the values that met the
    condition, and an event. Rules are read by the job's supervisor (a job of one node),
    live through a broker outage and a worker's restart, and are off under --replay.
    """
    import json

    from loomrun._proto import loomrun_pb2 as pb
    from loomrun.rulebook import read_rule
    from loomrun.rulelang import RuleError

    try:  # before the broker is asked anything: a rule that does not parse is a usage error
        read_rule(pb.Rule(name=name, when=when, then=then, cooldown=cooldown, across=across))
    except RuleError as error:
        raise click.UsageError(str(error)) from None
    found, rule = steer(
        broker, lambda s: s.add_rule(job, name, when, then, cooldown, across, replicas)
    )
    if as_json:
        click.echo(json.dumps({"job": found, "rule": _plain(rule)}))
        return
    click.echo(f"rule {name} added to job {found}: when {when}, then {then}")


@rule_group.command("ls", epilog=RULE_CODES)
@job_option()
@json_option()
@broker_options
def ls_command(job, as_json, broker):
    """List the job's rules."""
    import json

    from loomrun import tables

    async def work(steering):
        found = await steering.job(job)
        return found.job, await steering.rules(found.job)

    found, rules = steer(broker, work)
    if as_json:
        click.echo(json.dumps({"job": found, "rules": [_plain(r) for r in rules]}))
        return
    if not rules:
        click.echo(f"no rule in job {found}")
        return
    rows = [
        [r.name, r.when, r.then, str(r.cooldown), r.across or "max", ",".join(r.replicas) or "all"]
        for r in rules
    ]
    tables.render(["NAME", "WHEN", "THEN", "COOLDOWN", "ACROSS", "REPLICAS"], rows)


@rule_group.command("rm", epilog=RULE_CODES)
@click.argument("name", callback=_rule_name)
@job_option()
@broker_options
def rm_command(name, job, broker):
    """Remove rule NAME: it fires no more (a firing's changes already asked still land)."""
    found = steer(broker, lambda s: s.remove_rule(job, name))
    click.echo(f"rule {name} removed from job {found}")


def _plain(rule) -> dict:
    return {
        "name": rule.name, "when": rule.when, "then": rule.then, "cooldown": rule.cooldown,
        "across": rule.across or "max", "replicas": list(rule.replicas), "origin": rule.origin,
    }  # fmt: skip
