"""Announcements: affine blocks as aggregates, borrowed /32s, communities."""

from __future__ import annotations

import ipaddress

import pytest

from bgpd.announce import OutAttrs, desired_announcements
from calyx.model import ClusterConfig, IPAMBlock, WorkloadEndpoint

pytestmark = pytest.mark.unit


def block(cidr: str, node: str | None) -> IPAMBlock:
    return IPAMBlock(cidr=ipaddress.ip_network(cidr), affinity=f"node:{node}" if node else None)


def wep(node: str, name: str, *addrs: str, state: str = "active") -> WorkloadEndpoint:
    return WorkloadEndpoint(node=node, orchestrator="cni", workload=name, endpoint="eth0", iface="cali0123456789a",
                            ipv4_nets=tuple(ipaddress.ip_network(a) for a in addrs), state=state)


def test_blocks_and_borrowed_addresses() -> None:
    blocks = [block("10.65.0.0/26", "a"), block("10.65.0.64/26", "b"), block("10.65.1.0/26", None),
              block("fd00::/122", "a")]
    weps = [wep("a", "w1", "10.65.0.5/32"), wep("a", "w2", "10.65.0.70/32"), wep("b", "w3", "10.65.0.71/32"),
            wep("a", "w4", "10.65.1.9/32", state="inactive")]
    out = desired_announcements("a", blocks, weps, ClusterConfig(communities=("64512:100", "64512:1:2")))
    assert sorted(out) == ["10.65.0.0/26", "10.65.0.70/32"]
    attrs = out["10.65.0.0/26"]
    assert attrs == OutAttrs(next_hop="self", communities=("64512:100",), large_communities=("64512:1:2",))


def test_nothing_for_other_nodes() -> None:
    assert desired_announcements("c", [block("10.65.0.0/26", "a")], [], ClusterConfig()) == {}
