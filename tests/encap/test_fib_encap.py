"""bgpd's FIB calculation for VXLAN pools, and mode switches re-programming routes without a restart."""

from __future__ import annotations

import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

import pytest

from bgpd.fib import VXLAN, Fib, PoolEncap, Spec, _parse, node_vteps, pool_mode, route_spec
from calyx.model import IPPool, Node
from tests.bgpd.topo import kernel_routes
from tests.fixtures.netns import Netns, create_veth

CONNECTED = (IPv4Network("10.0.1.0/24"),)
POOLS = (PoolEncap(IPv4Network("10.65.0.0/16"), "Never", "CrossSubnet"),
         PoolEncap(IPv4Network("10.70.0.0/16"), "Never", "Always"),
         PoolEncap(IPv4Network("10.75.0.0/16"), "CrossSubnet", "Never"))
VTEPS = {"10.0.9.12": IPv4Address("10.65.7.1"), "10.0.1.12": IPv4Address("10.65.8.1")}


def a(text: str) -> bytes:
    return socket.inet_aton(text)


def spec(prefix: str, *hops: str, vteps: dict[str, IPv4Address] = VTEPS) -> Spec | None:
    parsed = _parse(prefix)
    assert parsed is not None
    return route_spec(hops, pool_mode(*parsed, POOLS), CONNECTED, vteps)


@pytest.mark.unit
def test_vxlan_modes_route_via_the_remote_vtep() -> None:
    s = spec("10.65.3.0/26", "10.0.9.12")  # CrossSubnet, not connected: via the VTEP on vxlan.calyx
    assert s == Spec(((a("10.65.7.1"), True),), VXLAN) and s.onlink
    assert s.describe() == "10.65.7.1 dev vxlan.calyx onlink"
    assert spec("10.65.3.0/26", "10.0.1.12") == Spec(((a("10.0.1.12"), False),), VXLAN)  # connected: direct
    assert spec("10.70.3.0/26", "10.0.1.12") == Spec(((a("10.65.8.1"), True),), VXLAN)  # Always: even connected
    assert spec("10.65.3.0/26", "10.0.9.99") is None  # no VTEP published and not connected
    assert spec("10.70.3.0/26", "10.0.1.99") == Spec(((a("10.0.1.99"), False),), VXLAN)  # no VTEP yet: direct
    ipip = spec("10.75.3.0/26", "10.0.9.12")  # IP-in-IP unchanged: via the node address on tunl0
    assert ipip is not None and ipip.dev == "tunl0" and ipip.hops == ((a("10.0.9.12"), True),)


@pytest.mark.unit
def test_node_vteps_maps_underlay_to_vtep() -> None:
    nodes = [Node.from_dict({"ipv4": "10.0.9.12/24", "vxlan_tunnel_address": "10.65.7.1",
                             "vxlan_tunnel_mac": "66:00:00:00:00:01"}, key="k", name="a"),
             Node.from_dict({"ipv4": "10.0.9.13/24"}, key="k", name="b"),
             Node.from_dict({"vxlan_tunnel_address": "10.65.9.1"}, key="k", name="c")]
    assert node_vteps(nodes) == {"10.0.9.12": IPv4Address("10.65.7.1")}


def pool(mode_field: str, mode: str) -> IPPool:
    return IPPool.from_dict({"cidr": "10.65.0.0/16", mode_field: mode}, key="k", name="p")


@pytest.mark.privileged
def test_mode_switch_reprograms_routes(netns: Callable[[], Netns]) -> None:
    """Never → VXLAN CrossSubnet → VXLAN Always → IP-in-IP (no tunl0 here: unroutable) → Never, one Fib."""
    h, peer = netns(), netns()
    create_veth(h, peer, "10.99.0.1/24", "10.99.0.2/24")
    h.ip("link", "add", VXLAN, "type", "vxlan", "id", "4096", "dstport", "4789", "local", "10.99.0.1", "nolearning")
    h.ip("link", "set", VXLAN, "up")
    fib = Fib(20, netns=h.name)
    try:
        fib.resync()
        fib.set_vteps({"10.99.0.2": IPv4Address("10.65.2.1"), "10.98.0.2": IPv4Address("10.65.3.1")})
        fib.update({"10.65.1.0/26": ("10.99.0.2",), "10.65.4.0/26": ("10.98.0.2",)})
        fib.set_pools([pool("vxlan_mode", "Never")])
        fib.apply(sweep=True)
        routes = kernel_routes(h)
        assert routes["10.65.1.0/26"]["gateway"] == "10.99.0.2" and routes["10.65.1.0/26"]["dev"] != VXLAN
        assert "10.65.4.0/26" not in routes
        fib.set_pools([pool("vxlan_mode", "CrossSubnet")])
        fib.apply(sweep=True)
        routes = kernel_routes(h)
        assert routes["10.65.1.0/26"]["gateway"] == "10.99.0.2"  # same subnet: direct
        r = routes["10.65.4.0/26"]
        assert (r["gateway"], r["dev"], "onlink" in r.get("flags", [])) == ("10.65.3.1", VXLAN, True)
        fib.set_pools([pool("vxlan_mode", "Always")])
        fib.apply(sweep=True)
        r = kernel_routes(h)["10.65.1.0/26"]
        assert (r["gateway"], r["dev"]) == ("10.65.2.1", VXLAN)
        fib.set_vteps({"10.99.0.2": IPv4Address("10.65.2.9"), "10.98.0.2": IPv4Address("10.65.3.1")})  # re-published
        fib.apply(sweep=True)
        assert kernel_routes(h)["10.65.1.0/26"]["gateway"] == "10.65.2.9"
        fib.set_pools([pool("ipip_mode", "CrossSubnet")])  # this kernel has no tunl0
        fib.apply(sweep=True)
        assert "no tunl0" in fib.unroutable["10.65.4.0/26"]
        assert kernel_routes(h)["10.65.1.0/26"]["gateway"] == "10.99.0.2"
        fib.set_pools([pool("vxlan_mode", "Never")])
        fib.apply(sweep=True)
        assert set(kernel_routes(h)) == {"10.65.1.0/26"}
    finally:
        fib.close()
