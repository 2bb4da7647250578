"""nats-server's configuration: the token in a 0600 file, never on its command line."""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from loomrun.broker import BrokerError
from loomrun.broker.state import HOST, state_dir

ROUTE_USER = "loomrun"


@dataclass(frozen=True)
class ClusterOptions:
    """A member of a NATS cluster (nats-server's own clustering, JetStream on): the
    cluster's name, where this member listens for routes, and the routes to the others."""

    name: str
    listen: str
    routes: tuple[str, ...]


def server_config(
    listen: str, port: int, store: Path, token: str, log: Path | None,
    cluster: ClusterOptions | None = None,
) -> str:  # fmt: skip
    """nats-server's configuration: the token lives here, not on its command line."""
    if not token:
        raise BrokerError("refusing to start a broker without a token")
    lines = [
        f"listen: {json.dumps(f'{listen}:{port}')}",
        f"jetstream {{ store_dir: {json.dumps(str(store))} }}",
        f"authorization {{ token: {json.dumps(token)} }}",
    ]
    if cluster is not None:
        # Routes carry every message: a member lets in only members that hold the token.
        secret = urllib.parse.quote(token, safe="")
        routes = ", ".join(
            json.dumps(r.replace("://", f"://{ROUTE_USER}:{secret}@", 1)) for r in cluster.routes
        )
        lines += [
            f"server_name: {json.dumps(f'{cluster.name}-{HOST}-{port}')}",
            f"cluster {{ name: {json.dumps(cluster.name)}, listen: {json.dumps(cluster.listen)},"
            f" authorization {{ user: {json.dumps(ROUTE_USER)}, password: {json.dumps(token)} }},"
            f" routes: [{routes}] }}",
        ]
    if log is not None:
        lines.append(f"log_file: {json.dumps(str(log))}")
    return "\n".join(lines) + "\n"


def default_store(port: int) -> Path:
    """JetStream's store for the bundled broker on `port`: whoever takes it over finds it."""
    return state_dir() / f"jetstream-{HOST}-{port}"


def config_path(port: int) -> Path:
    return state_dir() / f"nats-server-{HOST}-{port}.conf"
