"""Node ranks and the master address agreed at start, as torchrun's c10d rendezvous does:
the same command on every node (`--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id
J --nnodes N`), no `--node-rank`.

The agreement goes through torch's own TCPStore at the endpoint, in a short-lived helper
process (`python -m loomrun.rendezvous`), so the supervisor never imports torch and the
broker is not needed for it (nor can a record of an earlier run there mislead it: the
store lives only as long as this rendezvous). The node that can bind the endpoint hosts
the store; the first node to arrive writes the job's shape (--nnodes, --nproc-per-node)
and a node started with another is refused before it takes a rank (mismatched ranks would
only hang in the workers' own rendezvous); every node adds itself to a counter, which
gives its node rank in order of arrival; node 0 picks the master port and says its
address as the others reach it. The host keeps the store until every node has read the
result, or its supervisor is gone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from loomrun.broker.connect import loopback_host
from loomrun.lifeline import end_with_parent, parent_env

DEFAULT_PORT = 29400  # torchrun's for --rdzv-endpoint
TIMEOUT = 900.0  # seconds a node waits for the others (torchrun's join timeout is 600)


class RendezvousError(Exception):
    """The nodes could not agree; one line for a person."""


@dataclass(frozen=True)
class Placement:
    """This node's rank and where the master listens, as the nodes agreed."""

    node_rank: int
    master_addr: str
    master_port: int


_HOST = re.compile(r"[A-Za-z0-9._:%-]+")  # a name, an IPv4 or IPv6 address: no spaces


def endpoint(text: str) -> tuple[str, int]:
    """`HOST[:PORT]` (IPv6 in brackets) -> (host, port)."""
    host, port = text, DEFAULT_PORT
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise RendezvousError(f"{text!r} is not HOST[:PORT] (an IPv6 address in [ ])")
        if rest:
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, rest = text.partition(":")
        port = _port(rest, text)
    if not host or not _HOST.fullmatch(host):
        raise RendezvousError(f"{text!r} is not HOST[:PORT]")
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise RendezvousError(f"{whole!r} is not HOST[:PORT] (a port is 1..65535)")
    return int(text)


def agree(where: str, nnodes: int, nproc: int, rdzv_id: str, timeout: float = TIMEOUT) -> Placement:
    """This node's rank and the master's address, agreed with the other nodes."""
    host, port = endpoint(where)
    helper = subprocess.Popen(
        [sys.executable, "-m", "loomrun.rendezvous", host, str(port), str(nnodes), str(nproc),
         rdzv_id, str(timeout)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, **parent_env()},  # it ends with this process, however that ends
    )  # fmt: skip
    answer = None
    try:
        deadline = time.monotonic() + timeout + 30
        line = ""
        while not line and time.monotonic() < deadline:
            ready, _, _ = select.select([helper.stdout], [], [], 1.0)
            if ready:
                line = helper.stdout.readline()
                if not line:
                    break
        try:
            answer = json.loads(line) if line else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise RendezvousError(f"rendezvous at {host}:{port} failed: no answer in time")
        if "error" in answer:
            raise RendezvousError(str(answer["error"]))
    finally:
        if not isinstance(answer, dict) or "error" in answer:
            helper.kill()
            helper.wait()
    # The helper goes on (holding the store, on the node that hosts it) until every node
    # has read the answer; it ends by itself, and with this process.
    return Placement(answer["node_rank"], answer["master_addr"], answer["master_port"])


def _address_towards(host: str) -> str:
    """This node's address on the route to `host`: IPv4 first, as a name with both kinds
    of address may have no IPv6 route; IPv6 when that is all there is, or was asked for."""
    found = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    found.sort(key=lambda info: info[0] != socket.AF_INET)
    error: OSError | None = None
    for family, kind, _, _, where in found:
        try:
            with socket.socket(family, kind) as probe:
                probe.connect(where)
                return probe.getsockname()[0]
        except OSError as failed:
            error = failed
    raise error or OSError(f"no route to {host}")


def master_address(route: str, endpoint_host: str, name: Callable[[], str]) -> str:
    """What node 0 tells the others to reach it by: its address on the route to the
    endpoint; but its host `name()`, which the other nodes can resolve (as torchrun's
    c10d does), when that address means nothing to them: a loopback one while the
    endpoint was not named as one (Debian maps a machine's own name to 127.0.1.1, so a
    node that hosts the endpoint reaches itself over loopback), or a link-local one,
    whose scope only this node knows."""
    try:
        address = ipaddress.ip_address(route)  # an IPv6 one may carry its %scope
    except ValueError:
        return route
    if (address.is_loopback and not loopback_host(endpoint_host)) or address.is_link_local:
        return name()
    return route


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _serve(host: str, port: int, nnodes: int, nproc: int, rdzv_id: str, timeout: float) -> None:
    from datetime import timedelta

    from torch.distributed import TCPStore

    parent = os.getppid()
    wait = timedelta(seconds=timeout)
    store, hosting = None, False
    with contextlib.suppress(RuntimeError, OSError):
        store = TCPStore(host, port, is_master=True, timeout=wait, wait_for_workers=False)
        hosting = True
    if store is None:  # another node hosts it (or this host is not the endpoint)
        store = TCPStore(host, port, is_master=False, timeout=wait)
    prefix = f"loomrun/{rdzv_id}/"
    shape = json.dumps([nnodes, nproc])
    first = json.loads(store.compare_set(prefix + "shape", "", shape))
    if first != [nnodes, nproc]:
        print(json.dumps({"error": (
            f"rendezvous {rdzv_id} at {host}:{port} was started with --nnodes {first[0]} "
            f"--nproc-per-node {first[1]}, this node with --nnodes {nnodes} --nproc-per-node "
            f"{nproc}: start every node with the same values"
        )}), flush=True)  # fmt: skip
        return
    rank = store.add(prefix + "joined", 1) - 1
    if rank >= nnodes:
        print(json.dumps({"error": (
            f"rendezvous {rdzv_id} at {host}:{port} already has its {nnodes} node(s) "
            "(--nnodes); is an earlier run of it still there?"
        )}), flush=True)  # fmt: skip
        return
    if rank == 0:
        master = [master_address(_address_towards(host), host, socket.getfqdn), _free_port()]
        store.set(prefix + "master", json.dumps(master))
    store.wait([prefix + "master"], wait)
    addr, master_port = json.loads(store.get(prefix + "master"))
    print(json.dumps({"node_rank": rank, "master_addr": addr, "master_port": master_port}),
          flush=True)  # fmt: skip
    store.add(prefix + "read", 1)
    deadline = time.monotonic() + timeout
    while hosting and store.add(prefix + "read", 0) < nnodes and time.monotonic() < deadline:
        if os.getppid() != parent:
            return  # its supervisor is gone
        time.sleep(0.1)


def main() -> None:
    end_with_parent()
    host, port, nnodes, nproc, rdzv_id, timeout = sys.argv[1:7]
    try:
        _serve(host, int(port), int(nnodes), int(nproc), rdzv_id, float(timeout))
    except Exception as error:  # noqa: BLE001 - one line for the supervisor to show
        said = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(json.dumps({"error": f"rendezvous at {host}:{port} failed: {said}"}), flush=True)


if __name__ == "__main__":
    main()
