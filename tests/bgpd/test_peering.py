"""Peering calculation: mesh with passive sides, explicit and selector peers, reflector topologies."""

from __future__ import annotations

from typing import Any

import pytest

from bgpd.peering import (
    PEER_GLOBAL,
    PEER_MESH,
    PEER_NODE_SPECIFIC,
    PEER_RR,
    PEER_RR_CLIENT,
    PEER_RR_NONCLIENT,
    desired_peers,
)
from calyx.datastore import keys
from calyx.model import BGPPeer, ClusterConfig, Node

pytestmark = pytest.mark.unit


def node(name: str, ip: str, **kw: Any) -> Node:
    return Node.from_dict({"ipv4": ip, **kw}, key=keys.node_key(name), name=name)


def peer(name: str, **kw: Any) -> BGPPeer:
    return BGPPeer.from_dict(kw, key=keys.bgp_peer_key(name), name=name)


NODES = {
    "a": node("a", "10.0.0.1/24", labels={"rack": "r1"}),
    "b": node("b", "10.0.0.2/24", labels={"rack": "r1"}),
    "c": node("c", "10.0.0.3/24", labels={"rack": "r2"}, as_number=65003),
}


def test_full_mesh_lower_address_connects() -> None:
    a = desired_peers("a", NODES, [], ClusterConfig())
    assert sorted(a) == ["10.0.0.2", "10.0.0.3"]
    assert not a["10.0.0.2"].passive and not a["10.0.0.3"].passive
    b = desired_peers("b", NODES, [], ClusterConfig())
    assert b["10.0.0.1"].passive and not b["10.0.0.3"].passive
    assert a["10.0.0.2"].peer_type == PEER_MESH
    assert a["10.0.0.2"].ibgp and a["10.0.0.2"].local_as == 64512
    # per-node AS: c is eBGP from a, and a is eBGP from c
    assert a["10.0.0.3"].peer_as == 65003 and not a["10.0.0.3"].ibgp
    assert desired_peers("c", NODES, [], ClusterConfig())["10.0.0.1"].local_as == 65003


def test_mesh_off_and_unknown_node() -> None:
    assert desired_peers("a", NODES, [], ClusterConfig(node_to_node_mesh=False)) == {}
    assert desired_peers("zz", NODES, [], ClusterConfig()) == {}
    no_ip = {"a": Node(name="a")}
    assert desired_peers("a", no_ip, [], ClusterConfig()) == {}


def test_global_node_specific_and_selected_peers() -> None:
    peers = [
        peer("tor1", peer_ip="10.0.0.254", as_number=65000, node_selector="rack == 'r1'", password="s3cret",
             hold_time=30, max_prefixes=100),
        peer("tor-all", peer_ip="10.0.0.253", as_number=65000),
        peer("only-b", peer_ip="10.0.0.252", as_number=65001, node="b", passive=True, graceful_restart=False),
        peer("self", peer_ip="10.0.0.1", as_number=65000),
    ]
    cfg = ClusterConfig(node_to_node_mesh=False)
    a = desired_peers("a", NODES, peers, cfg)
    assert sorted(a) == ["10.0.0.253", "10.0.0.254"]  # not itself, not b's peer
    tor = a["10.0.0.254"]
    assert (tor.password, tor.hold_time, tor.max_prefixes, tor.passive) == ("s3cret", 30, 100, False)
    assert a["10.0.0.253"].peer_type == PEER_GLOBAL
    b = desired_peers("b", NODES, peers, cfg)
    assert b["10.0.0.252"].peer_type == PEER_NODE_SPECIFIC and b["10.0.0.252"].passive
    assert not b["10.0.0.252"].graceful_restart
    c = desired_peers("c", NODES, peers, cfg)
    assert sorted(c) == ["10.0.0.1", "10.0.0.253"]  # "self" is only refused by the node it names


def test_explicit_peer_beats_mesh_for_same_address() -> None:
    peers = [peer("to-b", peer_ip="10.0.0.2", as_number=64512, node="a", password="pw")]
    a = desired_peers("a", NODES, peers, ClusterConfig())
    assert a["10.0.0.2"].password == "pw" and a["10.0.0.2"].peer_type == PEER_NODE_SPECIFIC


def test_peer_selector_is_symmetric() -> None:
    nodes = {
        "rr": node("rr", "10.0.0.10/24", labels={"role": "rr"}, route_reflector_cluster_id="1.1.1.1"),
        "a": node("a", "10.0.0.1/24"),
        "b": node("b", "10.0.0.2/24"),
    }
    peers = [peer("to-rr", peer_selector="role == 'rr'", node_selector="!has(role)")]
    cfg = ClusterConfig(node_to_node_mesh=False)
    a = desired_peers("a", nodes, peers, cfg)
    assert list(a) == ["10.0.0.10"] and a["10.0.0.10"].peer_type == PEER_RR
    rr = desired_peers("rr", nodes, peers, cfg)
    assert sorted(rr) == ["10.0.0.1", "10.0.0.2"]
    assert all(n.rr_client and n.peer_type == PEER_RR_CLIENT for n in rr.values())
    assert all(n.passive for n in rr.values())  # the reflector has the higher address


def test_mesh_with_reflectors_becomes_reflector_topology() -> None:
    nodes = {
        "rr1": node("rr1", "10.0.0.10/24", route_reflector_cluster_id="1.1.1.1"),
        "rr2": node("rr2", "10.0.0.11/24", route_reflector_cluster_id="1.1.1.1"),
        "a": node("a", "10.0.0.1/24"),
        "b": node("b", "10.0.0.2/24"),
    }
    a = desired_peers("a", nodes, [], ClusterConfig())
    assert sorted(a) == ["10.0.0.10", "10.0.0.11"]  # clients do not mesh
    rr1 = desired_peers("rr1", nodes, [], ClusterConfig())
    assert sorted(rr1) == ["10.0.0.1", "10.0.0.11", "10.0.0.2"]
    assert rr1["10.0.0.1"].rr_client and rr1["10.0.0.2"].rr_client
    assert not rr1["10.0.0.11"].rr_client and rr1["10.0.0.11"].peer_type == PEER_RR_NONCLIENT


def test_router_id_override_and_gr_off() -> None:
    a = desired_peers("a", NODES, [], ClusterConfig(graceful_restart_time=0), router_id="192.0.2.1")
    assert all(n.router_id == "192.0.2.1" and not n.graceful_restart for n in a.values())
