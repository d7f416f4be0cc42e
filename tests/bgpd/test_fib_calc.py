"""FIB route calculation: direct, ECMP, IP-in-IP for Always/CrossSubnet pools, unroutable next hops."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from bgpd.fib import PoolEncap, kernel_route
from calyx.kernel.routetable import PROTO_BGPD, NextHop

pytestmark = pytest.mark.unit

CONNECTED = (IPv4Network("10.0.1.0/24"), IPv4Network("10.0.2.0/31"))
POOLS = (PoolEncap(IPv4Network("10.65.0.0/16"), "CrossSubnet"), PoolEncap(IPv4Network("10.70.0.0/16"), "Always"),
         PoolEncap(IPv4Network("10.80.0.0/16"), "Never"))


def route(prefix: str, *hops: str):  # type: ignore[no-untyped-def]
    return kernel_route(IPv4Network(prefix), hops, connected=CONNECTED, pools=POOLS, metric=20)


def test_direct_and_ecmp() -> None:
    r = route("10.80.1.0/26", "10.0.1.12")
    assert r is not None and r.gateway == IPv4Address("10.0.1.12") and r.oif is None
    assert r.metric == 20 and r.proto == PROTO_BGPD
    r = route("10.80.1.0/26", "10.0.2.0", "10.0.1.1")
    assert r is not None and r.nexthops == (NextHop(IPv4Address("10.0.1.1")), NextHop(IPv4Address("10.0.2.0")))


def test_ipip_modes() -> None:
    r = route("10.65.3.0/26", "10.0.9.12")  # CrossSubnet, not connected: tunnel
    assert r is not None and (r.gateway, r.oif, r.onlink) == (IPv4Address("10.0.9.12"), "tunl0", True)
    r = route("10.65.3.0/26", "10.0.1.12")  # CrossSubnet, connected: direct
    assert r is not None and r.oif is None and not r.onlink
    r = route("10.70.3.0/26", "10.0.1.12")  # Always: tunnel even on the same subnet
    assert r is not None and r.oif == "tunl0" and r.onlink
    assert route("10.80.3.0/26", "10.0.9.12") is None  # Never and not connected: cannot be installed
    assert route("10.99.0.0/24", "10.0.9.12") is None  # outside every pool and not connected
    assert route("10.99.0.0/24", "garbage") is None
