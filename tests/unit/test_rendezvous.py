"""The c10d rendezvous' addresses, in process."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "route, endpoint_host, told",
    [
        ("10.0.0.5", "node0", "10.0.0.5"),
        ("127.0.1.1", "node0.cluster", "node0.cluster"),  # Debian's own-name loopback alias
        ("127.0.0.1", "127.0.0.1", "127.0.0.1"),  # every node on this machine, as in tests
        ("127.0.0.1", "localhost", "127.0.0.1"),
        ("::1", "::1", "::1"),
        ("fe80::1%eth0", "node0", "node0.cluster"),  # a scope only node 0 knows
    ],
)
def test_node_0_tells_an_address_the_other_nodes_can_reach(route, endpoint_host, told):
    from loomrun.rendezvous import master_address

    assert master_address(route, endpoint_host, lambda: "node0.cluster") == told


def test_the_route_towards_the_endpoint_is_found_for_ipv4_and_ipv6():
    import socket

    from loomrun.rendezvous import _address_towards

    assert _address_towards("127.0.0.1") == "127.0.0.1"
    if socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
                probe.connect(("::1", 9))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
        assert _address_towards("::1") == "::1"
