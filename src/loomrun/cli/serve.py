"""The long-running servers: `loomrun server` (the bundled NATS broker, in the
foreground) and `loomrun ui` (the web page)."""

from __future__ import annotations

import os
import re
import sys

import click

from loomrun.cli.options import NoBroker, broker_options, job_option


@click.command("server")
@click.option("--listen", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(1, 65535), default=4222, show_default=True)
@click.option(
    "--token",
    envvar="LOOMRUN_NATS_TOKEN",
    help="Require this token from clients [default: this user's secret, made on first use].",
)
@click.option(
    "--cluster",
    "cluster_listen",
    metavar="HOST:PORT",
    default=None,
    help="Be a member of a NATS cluster: listen for its routes here.",
)
@click.option(
    "--routes",
    default="",
    metavar="URL,URL",
    help="With --cluster: the other members' route URLs, e.g. nats://10.0.0.2:6222.",
)
@click.option(
    "--cluster-name", default="loomrun", show_default=True, help="With --cluster: its name."
)  # fmt: skip
def server_command(listen, port, token, cluster_listen, routes, cluster_name):
    """Run the bundled NATS broker (JetStream on) in the foreground, for a long-lived broker.

    It always requires a token: yours from your state directory unless --token (or
    LOOMRUN_NATS_TOKEN) gives another. Your own loomrun commands on this host connect
    without flags; anyone else needs the token.

    \b
    A cluster of three hosts, each member started with the other two as routes and the
    same token (members let in only routes that hold it):
      loomrun server --listen 0.0.0.0 --token $T --cluster 10.0.0.1:6222 \\
          --routes nats://10.0.0.2:6222,nats://10.0.0.3:6222
    Jobs and commands then connect with --nats nats://10.0.0.1:4222 and
    LOOMRUN_NATS_TOKEN=$T, keep three copies of their state with LOOMRUN_NATS_REPLICAS=3,
    and losing one member loses no change.
    """
    from loomrun.broker import BrokerError
    from loomrun.broker.bundled import server_binary
    from loomrun.broker.config import ClusterOptions, default_store, server_config
    from loomrun.broker.state import local_secret, private_state_dir, secret_path, write_private

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cluster_name):
        raise click.BadParameter(
            f"{cluster_name!r} is not a cluster name (letters, digits, - and _)",
            param_hint="--cluster-name",
        )
    _check_listen(listen, port, "--listen/--port")
    if cluster_listen is not None:
        if not routes.strip():  # nats-server's JetStream refuses a cluster of one
            raise click.UsageError("--cluster needs --routes: the other members' route URLs")
        host, _, number = cluster_listen.rpartition(":")
        if not host or not number.isdigit() or not 1 <= int(number) <= 65535:
            raise click.BadParameter(
                f"{cluster_listen!r} is not HOST:PORT (like 0.0.0.0:6222)", param_hint="--cluster"
            )
        _check_listen(host.strip("[]"), int(number), "--cluster")
    try:
        binary = server_binary()
        state = private_state_dir()
        secret = token or local_secret()
        store = default_store(port)
        store.mkdir(parents=True, exist_ok=True, mode=0o700)
        config = state / f"nats-server-{port}.conf"
        cluster = None
        if cluster_listen is not None:
            listed = tuple(r.strip() for r in routes.split(",") if r.strip())
            for route in listed:
                if not re.fullmatch(r"nats(-route)?://[^\s/]+:\d{1,5}", route):
                    raise click.BadParameter(
                        f"{route!r} is not a route URL (like nats://10.0.0.2:6222)",
                        param_hint="--routes",
                    )
            cluster = ClusterOptions(cluster_name, cluster_listen, listed)
        elif routes:
            raise click.UsageError("--routes goes with --cluster HOST:PORT")
        write_private(config, server_config(listen, port, store, secret, None, cluster))
    except (BrokerError, OSError) as error:
        raise click.ClickException(str(error)) from None
    url = f"nats://{listen}:{port}"
    click.echo(f"loomrun: NATS broker on {url}, store {store}", err=True)
    if token:
        click.echo("loomrun: clients connect with LOOMRUN_NATS_TOKEN set to that token", err=True)
    else:
        click.echo(
            f"loomrun: your loomrun commands here connect as they are; elsewhere, "
            f"LOOMRUN_NATS={url} LOOMRUN_NATS_TOKEN=$(cat {secret_path()})",
            err=True,
        )
    os.execv(str(binary), [str(binary), "-c", str(config)])


def _check_listen(host: str, port: int, option: str) -> None:
    """The server can listen there: said in one line before it starts, not as the last of
    the broker's own log lines after loomrun said it runs."""
    import socket

    host = host.strip("[]")  # "[::]": every IPv6 address, as nats-server takes it
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:  # "::" is every address, IPv4 ones too, as nats-server binds it
        socket.create_server((host, port), family=family, dualstack_ipv6=host == "::").close()
    except (OSError, UnicodeError) as error:
        reason = (getattr(error, "strerror", None) or str(error)).split(" (while")[0]
        raise click.BadParameter(
            f"cannot listen on {host}:{port}: {reason}", param_hint=option
        ) from None


@click.command("ui")
@job_option(help="Show this job first [default: the newest].")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=0, show_default=True,
    help="Port on 127.0.0.1 [default 0: any free one].",
)  # fmt: skip
@broker_options
def ui_command(job, port, broker):
    """Serve a web page of the jobs on 127.0.0.1: replicas, curves with a marker at each
    change, devices, events, and controls with every replica's answer.

    It prints the page's URL with a random token (like Jupyter's); only who holds it gets
    in. It uses the broker's credentials of the user who starts it; every control goes
    through the same checks and answers as `loomrun set`. Ctrl-C stops it; the jobs go on.
    """
    import asyncio

    from loomrun.broker import BrokerError
    from loomrun.ui.server import ListenError, serve

    def ready(url: str) -> None:
        click.echo(f"loomrun ui: {url}", err=False)
        click.echo("Open it in a browser on this machine (or through an SSH tunnel); Ctrl-C stops.")
        sys.stdout.flush()

    try:
        asyncio.run(serve(broker, job, port, ready))
    except KeyboardInterrupt:
        return
    except BrokerError as error:
        raise NoBroker(error) from None
    except ListenError as error:
        raise click.BadParameter(str(error), param_hint="--port") from None
