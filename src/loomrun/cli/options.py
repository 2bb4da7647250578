"""What the commands share: the broker options, --job, --replica, --json, a number of
seconds, and the one error for a broker that cannot be reached (exit 4)."""

from __future__ import annotations

import functools
import os
import sys

import click

from loomrun.subjects import JOB_ID, REPLICA_NAME

EXIT_REJECTED, EXIT_TIMED_OUT, EXIT_NO_BROKER = 1, 3, 4


class NoBroker(click.ClickException):
    """The broker cannot be reached, or stopped answering: `Error: ...`, exit 4."""

    exit_code = EXIT_NO_BROKER

    def __init__(self, error: BaseException | str):
        from loomrun.printable import printable

        super().__init__(printable(str(error)))


def broker_of(nats_url: str, nats_creds: str | None, nats_ca: str | None):
    """The BrokerOptions the flags give; a token comes from LOOMRUN_NATS_TOKEN."""
    from loomrun.broker import BrokerError
    from loomrun.broker.connect import BrokerOptions, host_port

    try:
        host_port(nats_url)
    except BrokerError as error:
        raise click.BadParameter(str(error), param_hint="--nats") from None
    token = os.environ.get("LOOMRUN_NATS_TOKEN") or None
    return BrokerOptions(nats_url, creds=nats_creds, token=token, ca=nats_ca)


def broker_options(f):
    """--nats, --nats-creds and --nats-ca, handed to the command as one `broker`
    (BrokerOptions); a token comes from the environment."""

    @functools.wraps(f)
    def command(*args, nats_url, nats_creds, nats_ca, **kwargs):
        return f(*args, broker=broker_of(nats_url, nats_creds, nats_ca), **kwargs)

    return broker_flags(command)


def broker_flags(f):
    """The three broker flags as they are, for `run`, which may run with no broker."""
    files = (
        ("--nats-ca", "LOOMRUN_NATS_CA", "CA file for a tls:// broker."),
        ("--nats-creds", "LOOMRUN_NATS_CREDS", "NATS credentials file (JWT and NKey seed)."),
    )
    for flag, variable, said in files:
        path = click.Path(dir_okay=False, exists=True)
        f = click.option(flag, type=path, envvar=variable, help=said)(f)
    return click.option(
        "--nats",
        "nats_url",
        envvar="LOOMRUN_NATS",
        default="nats://127.0.0.1:4222",
        show_default=True,
        metavar="URL",
        help="NATS broker [env LOOMRUN_NATS; token from LOOMRUN_NATS_TOKEN].",
    )(f)


def validate_job(ctx, param, value):
    if value is not None and not JOB_ID.fullmatch(value):
        raise click.BadParameter(
            f"'{value}' is not a valid job id (expected letters, digits, '-' or '_', "
            "at most 64, starting with a letter or digit)"
        )
    return value


def job_option(help: str = "Job id [default: the only running job].", **kwargs):
    return click.option("--job", callback=validate_job, help=help, **kwargs)


def _replica_list(ctx, param, values: tuple[str, ...]) -> list[str] | None:
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if values and not names:  # `--replica "$R"` with R unset: not every replica
        raise click.BadParameter("no replica named (expected r0, r1, ...)")
    for name in names:
        if not REPLICA_NAME.fullmatch(name):
            raise click.BadParameter(f"'{name}' is not a replica name (expected r0, r1, ...)")
    return names or None


def replica_option(help: str | None = None):
    return click.option(
        "--replica", "replicas", multiple=True, callback=_replica_list, metavar="r1,r2", help=help
    )


def json_option(help: str = "Print one JSON object."):
    return click.option("--json", "as_json", is_flag=True, help=help)


class Seconds(click.FloatRange):
    """A finite number of seconds: click's FloatRange lets nan and inf through."""

    def convert(self, value, param, ctx):
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return number


def run_async(work):
    """asyncio.run(work()): a broker's error becomes NoBroker, a client's a usage error."""
    import asyncio

    from loomrun.broker import BrokerError
    from loomrun.client import SteerError
    from loomrun.printable import printable

    try:
        return asyncio.run(work())
    except SteerError as error:
        raise click.UsageError(printable(error)) from None
    except BrokerError as error:
        raise NoBroker(error) from None


def steer(options, work):
    """Run `work(steering)` against the broker; its errors become one-line CLI errors."""
    from loomrun.client import Steering

    async def session():
        async with Steering.connect(options) as steering:
            return await work(steering)

    return run_async(session)


def broker_first(job, read, fallback):
    """`loomrun log` and `schema`: what `read()` got from the broker; `fallback` when the
    broker cannot answer for the job named, whose record is then read from disk. Without a
    job named, the broker's error is the answer."""
    import asyncio

    from loomrun.broker import BrokerError
    from loomrun.client import SteerError
    from loomrun.printable import printable

    try:
        return asyncio.run(read())
    except KeyboardInterrupt:
        sys.exit(0)
    except SteerError as error:
        if job is None:
            raise click.UsageError(printable(error)) from None
    except BrokerError as error:
        if job is None:
            raise NoBroker(error) from None
    return fallback
