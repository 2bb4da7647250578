"""snapshot, rollback, save, copy: actions on a running job's training state, each done
once at one step (the ranks of a process group: one they agree on) and answered like a
`set`."""

from __future__ import annotations

import os

import click

from loomrun.cli.options import Seconds, broker_options, job_option, json_option
from loomrun.cli.steer import run_change, steering_options

ACTION_CODES = (
    "Exit codes: 0 done on every replica; 1 not done somewhere (refused, its step missed, "
    "replaced by a later one of its kind, or the replica is not running); 3 timed out (it "
    "stays asked for, and is done when the replica gets to it); 2 usage; 4 no broker."
)


def _snapshot_name(ctx, param, value: str | None) -> str | None:
    from loomrun.subjects import SNAPSHOT_NAME

    if value is not None and not SNAPSHOT_NAME.fullmatch(value):
        raise click.BadParameter(
            f"{value!r} is not a snapshot name (expected letters, digits, _ . and -, at most "
            "64, starting with a letter or digit)"
        )
    return value


@click.command("snapshot", epilog=ACTION_CODES)
@click.argument("name", required=False, callback=_snapshot_name)
@click.option("--list", "listing", is_flag=True, help="List the snapshots the replicas keep.")
@click.option(
    "--every",
    type=click.IntRange(0, 2**62),
    default=None,
    help="Take one every N steps (at each multiple of N), keeping a rolling set; 0 stops.",
)
@click.option(
    "--keep",
    type=click.IntRange(1, 100),
    default=None,
    help="With --every: how many periodic snapshots are kept [default: as before; 2 at first].",
)
@steering_options
def snapshot_command(
    name, listing, every, keep, job, replicas, at_step, force, timeout, no_wait, as_json, broker
):
    """Copy the training state to host memory, at one step, on every replica.

    \b
      loomrun snapshot before-lr             a snapshot named before-lr
      loomrun snapshot                       named after its step (step-1200)
      loomrun snapshot --every 500 --keep 3  one every 500 steps, the last 3 kept
      loomrun snapshot --list                what the replicas keep
    A snapshot holds every parameter and buffer of the modules the optimizers train, the
    optimizers', schedulers' and GradScaler's state, and the RNG states: everything
    `loomrun rollback` puts back. It is taken at a step boundary, before that step's
    optimizer step, at one step on every rank of a process group. Snapshots live in the
    worker's memory (a restart loses them), within LOOMRUN_SNAPSHOT_MEMORY; each answer
    gives its size and the time it took.
    """
    from loomrun.subjects import SNAPSHOT, SNAPSHOT_EVERY

    if listing:
        if name or every is not None or keep is not None:
            raise click.UsageError("--list takes no NAME, --every or --keep")
        _list(job, replicas, as_json, broker)
        return
    if keep is not None and every is None:
        raise click.UsageError("--keep goes with --every N (how many periodic snapshots)")
    if every is not None and name:
        raise click.UsageError("--every takes no NAME: periodic snapshots are named step-N")
    if every is not None:
        action, value = SNAPSHOT_EVERY, {"every": every} | ({"keep": keep} if keep else {})
    else:
        action, value = SNAPSHOT, {"name": name or ""}
    run_change(
        broker, job, no_wait, as_json,
        lambda s: s.act(job, action, value, replicas, at_step, timeout, not no_wait, force),
    )  # fmt: skip


def _list(job, replicas, as_json, broker) -> None:
    import json
    import time

    from loomrun import tables
    from loomrun.cli.options import steer
    from loomrun.outcomes import size_words

    found, rows, every = steer(broker, lambda s: s.snapshots(job))
    if replicas:
        rows = [dict(r, replicas=[x for x in r["replicas"] if x in replicas]) for r in rows]
        rows = [r for r in rows if r["replicas"]]
        every = {r: setting for r, setting in every.items() if r in replicas}
    if as_json:
        periodic = {r: {"every": e, "keep": k} for r, (e, k) in every.items()}
        click.echo(json.dumps({"job": found, "snapshots": rows, "periodic": periodic}))
        return
    settings = {(e, k) for e, k in every.values()}
    if len(settings) == 1 and (setting := settings.pop())[0]:
        click.echo(f"a snapshot every {setting[0]} steps, the last {setting[1]} kept")
    if not rows:
        click.echo(f"no snapshot in job {found}")
        return
    table = [
        [
            r["name"], str(r["step"]), size_words(r["bytes"]), ",".join(r["replicas"]),
            "every" if r["periodic"] else "named",
            time.strftime("%H:%M:%S", time.localtime(r["time"])),
        ]
        for r in rows
    ]  # fmt: skip
    tables.render(["NAME", "STEP", "SIZE", "REPLICAS", "KIND", "TAKEN"], table)


@click.command("rollback", epilog=ACTION_CODES)
@click.argument("name", required=False, callback=_snapshot_name)
@click.option(
    "--before",
    type=click.IntRange(1, 2**62),
    default=None,
    help="The newest snapshot taken before this step [default: the newest].",
)
@steering_options
def rollback_command(
    name, before, job, replicas, at_step, force, timeout, no_wait, as_json, broker
):
    """Put the training state of a snapshot back, in place, with no restart.

    \b
      loomrun rollback                       to the newest snapshot
      loomrun rollback before-lr             to the one named before-lr
      loomrun rollback --before 1200         to the newest taken before step 1200
    Parameters, buffers, the optimizers', schedulers' and GradScaler's state and the RNG
    states go back to the snapshot's, on every rank at one step; every gradient is then
    None. At the usual boundary, inside the optimizer's step, that step's gradients were
    computed on the parameters thrown away: the step changes nothing, and the schedulers
    skip theirs. (With `loomrun.step()` at the top of the loop, or Lightning's callback,
    the rollback comes before the forward, and that step trains from the snapshot.) What
    stays: loomrun's step count (it goes on), the values loomrun
    steers (in effect until the next change), the data loader (its next batch, not the
    snapshot's), and the script's own variables (a loop that computes lr from its own
    iteration number goes on from there).
    """
    from loomrun.subjects import ROLLBACK

    if name and before is not None:
        raise click.UsageError("give a snapshot's NAME or --before STEP, not both")
    value = {"name": name or "", "before": before or 0}
    run_change(
        broker, job, no_wait, as_json,
        lambda s: s.act(job, ROLLBACK, value, replicas, at_step, timeout, not no_wait, force),
    )  # fmt: skip


@click.command("save", epilog=ACTION_CODES)
@click.argument("folder", metavar="DIR")
@steering_options
def save_command(folder, job, replicas, at_step, force, timeout, no_wait, as_json, broker):
    """Write a checkpoint of every replica at one step: DIR/rN.pt, one file per rank.

    \b
      loomrun save /ckpt/run7                /ckpt/run7/r0.pt, r1.pt, ...
      loomrun save '/ckpt/step-{step}'       {step} is the step it was taken at
    Each file is written whole or not at all (a file beside it, then renamed) and loads
    with `torch.load(path, weights_only=True)`: modules (state_dicts, without DDP's or
    torch.compile's prefix), optimizers, schedulers, scalers, rng, values (the
    parameters in effect), step, replica, rank, world_size. A Lightning job saves through
    its trainer (DIR/checkpoint.ckpt; DIR/rN.ckpt for a replica of its own), which
    `ckpt_path=` resumes from. DIR is a folder on each worker's host; a relative one is
    taken from this shell's folder.
    """
    from loomrun.subjects import SAVE

    if not folder.strip():
        raise click.BadParameter("the folder is empty", param_hint="DIR")
    value = {"dir": os.path.abspath(os.path.expanduser(folder))}
    run_change(
        broker, job, no_wait, as_json,
        lambda s: s.act(job, SAVE, value, replicas, at_step, timeout, not no_wait, force),
    )  # fmt: skip


def _copy_args(ctx, param, values: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """`r2 r3 lr=0.004`: the replicas to copy into, and the values to set on them."""
    from loomrun.cli.steer import _parse_assignments
    from loomrun.subjects import REPLICA_NAME

    targets = [v for v in values if "=" not in v]
    for name in targets:
        if not REPLICA_NAME.fullmatch(name):
            raise click.BadParameter(f"{name!r} is not a replica (like r2) nor KEY=VALUE")
    if not targets:
        raise click.BadParameter("name a replica to copy into (like r2)")
    return targets, _parse_assignments(ctx, param, tuple(v for v in values if "=" in v))


@click.command("copy", epilog=ACTION_CODES)
@click.argument("args", nargs=-1, required=True, callback=_copy_args,
                metavar="REPLICA... [KEY=VALUE...]")  # fmt: skip
@click.option("--from", "source", required=True, metavar="REPLICA", help="Whose state to copy.")
@click.option(
    "--via",
    type=click.Choice(["auto", "shm", "store"]),
    default="auto",
    show_default=True,
    help="Shared memory (one host), or the broker's object store (between hosts); auto "
    "chooses by where the two replicas run.",
)
@job_option()
@click.option("--timeout", type=Seconds(min=0), default=60.0, show_default=True,
              help="Seconds to wait for each answer.")  # fmt: skip
@json_option()
@broker_options
def copy_command(args, source, via, job, timeout, as_json, broker):
    """Give replicas another replica's training state at their next step, with no restart
    (the exploit of population-based training), and set values beside it (explore).

    \b
      loomrun copy r2 --from r0              r2 trains on from r0's state
      loomrun copy r2 r3 --from r0 lr=0.004  and with lr 0.004 (explore)
    For independent replicas (--replicas N without torch.distributed). The source writes
    what a snapshot holds (parameters, buffers, optimizer, scheduler and GradScaler state;
    not its RNG, nor the values loomrun steers on it) at one step, into shared memory, or
    for a replica on another host into the broker's JetStream object store (within
    LOOMRUN_COPY_STORE_BYTES in the job's environment, 1G unless told). The values are set
    next, then each target puts the state in place at its next step. Each answer says at
    which step, how many bytes and how long the worker took (not the object store's part).
    """
    from loomrun.subjects import REPLICA_NAME

    targets, values = args
    if not REPLICA_NAME.fullmatch(source):
        raise click.BadParameter(f"{source!r} is not a replica (like r0)", param_hint="--from")
    if source in targets:
        raise click.BadParameter(f"{source} cannot copy its own state", param_hint="--from")
    run_change(
        broker, job, False, as_json, lambda s: s.copy(job, targets, source, values, via, timeout)
    )
