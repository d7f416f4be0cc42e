"""FIB route shapes: direct, ECMP, IP-in-IP for Always/CrossSubnet pools, unroutable next hops."""

from __future__ import annotations

import socket
from ipaddress import IPv4Network

import pytest

from bgpd.fib import PoolEncap, Spec, _parse, pool_mode, route_spec

pytestmark = pytest.mark.unit

CONNECTED = (IPv4Network("10.0.1.0/24"), IPv4Network("10.0.2.0/31"))
POOLS = (PoolEncap(IPv4Network("10.65.0.0/16"), "CrossSubnet"), PoolEncap(IPv4Network("10.70.0.0/16"), "Always"),
         PoolEncap(IPv4Network("10.80.0.0/16"), "Never"))


def spec(prefix: str, *hops: str) -> Spec | None:
    parsed = _parse(prefix)
    assert parsed is not None
    return route_spec(hops, pool_mode(*parsed, POOLS), CONNECTED)


def a(text: str) -> bytes:
    return socket.inet_aton(text)


def test_direct_and_ecmp() -> None:
    assert spec("10.80.1.0/26", "10.0.1.12") == Spec(((a("10.0.1.12"), False),))
    assert spec("10.80.1.0/26", "10.0.2.0", "10.0.1.1") == Spec(((a("10.0.1.1"), False), (a("10.0.2.0"), False)))


def test_ipip_modes() -> None:
    s = spec("10.65.3.0/26", "10.0.9.12")  # CrossSubnet, not connected: tunnel
    assert s == Spec(((a("10.0.9.12"), True),)) and s.onlink
    assert spec("10.65.3.0/26", "10.0.1.12") == Spec(((a("10.0.1.12"), False),))  # CrossSubnet, connected
    assert spec("10.70.3.0/26", "10.0.1.12") == Spec(((a("10.0.1.12"), True),))  # Always: even on the subnet
    assert spec("10.80.3.0/26", "10.0.9.12") is None  # Never and not connected: cannot be installed
    assert spec("10.99.0.0/24", "10.0.9.12") is None  # outside every pool and not connected
    assert spec("10.99.0.0/24", "garbage") is None


def test_prefix_parsing() -> None:
    assert _parse("10.1.2.0/24") == (a("10.1.2.0"), 24)
    assert _parse("10.1.2.3") == (a("10.1.2.3"), 32)
    for bad in ("10.1.2.1/24", "10.1/16", "10.1.2.0/33", "x/24", "fd00::/64", "10.1.2.0/x"):
        assert _parse(bad) is None, bad
