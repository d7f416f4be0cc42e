"""The desired BGP peer set of one node, computed purely from the cluster model.

What it owns: nothing in the kernel or the datastore. :func:`desired_peers` takes this node's name,
every :class:`Node`, every :class:`BGPPeer` and the :class:`ClusterConfig`, and returns the
neighbours this node's ExaBGP must have, keyed by peer address. Same input, same output.

Where a peering comes from (the first source wins when two name the same address):

1. **Explicit peers** (``peer_ip``): ``node`` = this node only, ``node_selector`` = the nodes it
   selects, neither = every node ("global"). A peer whose address is one of ours is ignored.
2. **Node peers by selector** (``peer_selector``): every other node the selector picks, with that
   node's address and AS. Like Calico, the relation is made symmetric: when node A's peering selects
   node B, B peers with A too, so writing the selector once on the clients is enough.
3. **The node-to-node mesh** (``node_to_node_mesh``). When no node is a route reflector it is a full
   mesh. When some are (``route_reflector_cluster_id``), the mesh becomes a reflector topology:
   reflectors peer with every node, clients peer with the reflectors only and not with each other.

Between two Calyx nodes one side is passive so the two TCP connections never collide: the node
with the lower address connects, the higher one waits (Calico's rule). A reflector treats a node
peer as its client when the peer is not a reflector of the same cluster id.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from calyx.model import BGPPeer, ClusterConfig, Node
from calyx.selector import parse as parse_selector

DEFAULT_HOLD_TIME = 90

PEER_MESH = "node-to-node mesh"
PEER_GLOBAL = "global"
PEER_NODE_SPECIFIC = "node specific"
PEER_SELECTED = "node selector"
PEER_RR_CLIENT = "route reflector client"
PEER_RR = "route reflector"
PEER_RR_NONCLIENT = "route reflector peer"


@dataclass(frozen=True, slots=True)
class Neighbor:
    """One BGP session of this node, as bgpd and ExaBGP need it."""

    peer_ip: str
    peer_as: int
    local_as: int
    local_address: str
    router_id: str
    peer_type: str
    passive: bool = False
    password: str | None = None
    hold_time: int = DEFAULT_HOLD_TIME
    keepalive: int | None = None
    max_prefixes: int | None = None
    graceful_restart: bool = True
    #: True when this node reflects routes to this peer as its route-reflector client
    rr_client: bool = False
    #: the Calyx node on the other side, if it is one
    peer_node: str | None = None
    #: where the peering came from (BGPPeer name, or "mesh")
    source: str = ""

    @property
    def ibgp(self) -> bool:
        return self.peer_as == self.local_as


@dataclass(frozen=True, slots=True)
class LocalIdentity:
    """This node's BGP identity."""

    name: str
    address: str
    prefixlen: int
    as_number: int
    router_id: str
    cluster_id: str | None


def local_identity(node: Node, cluster: ClusterConfig, router_id: str | None = None) -> LocalIdentity | None:
    """This node's address, AS, router id and cluster id; None while the node has no IPv4 address."""
    if node.ipv4 is None:
        return None
    addr = str(node.ipv4.ip)
    cid = str(node.route_reflector_cluster_id) if node.route_reflector_cluster_id is not None else None
    return LocalIdentity(node.name, addr, node.ipv4.network.prefixlen, node.as_number or cluster.as_number,
                         router_id or addr, cid)


def _applies_to(peer: BGPPeer, node: Node) -> bool:
    """Does the peering ``peer`` apply to ``node`` (the local side)?"""
    if peer.node is not None:
        return peer.node == node.name
    if peer.node_selector is not None:
        return parse_selector(peer.node_selector).evaluate(node.labels_with_name)
    return True


def _is_rr(node: Node) -> bool:
    return node.route_reflector_cluster_id is not None


def _node_neighbor(me: LocalIdentity, my_node: Node, other: Node, cluster: ClusterConfig, peer_type: str,
                   source: str, peer: BGPPeer | None = None) -> Neighbor | None:
    if other.ipv4 is None:
        return None
    other_ip = str(other.ipv4.ip)
    if other_ip == me.address:
        return None
    rr_client = _is_rr(my_node) and other.route_reflector_cluster_id != my_node.route_reflector_cluster_id
    if rr_client:
        peer_type = PEER_RR_CLIENT
    elif _is_rr(other) and not _is_rr(my_node):
        peer_type = PEER_RR
    elif _is_rr(other) and _is_rr(my_node):
        peer_type = PEER_RR_NONCLIENT
    passive = int(ipaddress.ip_address(me.address)) > int(ipaddress.ip_address(other_ip))
    return Neighbor(
        peer_ip=other_ip,
        peer_as=other.as_number or cluster.as_number,
        local_as=me.as_number,
        local_address=me.address,
        router_id=me.router_id,
        peer_type=peer_type,
        passive=passive,
        password=peer.password if peer else None,
        hold_time=(peer.hold_time if peer and peer.hold_time is not None else DEFAULT_HOLD_TIME),
        keepalive=peer.keepalive if peer else None,
        max_prefixes=peer.max_prefixes if peer else None,
        graceful_restart=(peer.graceful_restart if peer else True) and cluster.graceful_restart_time > 0,
        rr_client=rr_client,
        peer_node=other.name,
        source=source,
    )


def desired_peers(
    node_name: str,
    nodes: Mapping[str, Node],
    peers: Iterable[BGPPeer],
    cluster: ClusterConfig,
    *,
    router_id: str | None = None,
) -> dict[str, Neighbor]:
    """The neighbours of ``node_name``, keyed by peer address (empty while the node is unknown)."""
    my_node = nodes.get(node_name)
    if my_node is None:
        return {}
    me = local_identity(my_node, cluster, router_id)
    if me is None:
        return {}
    out: dict[str, Neighbor] = {}
    peer_list = sorted(peers, key=lambda p: p.name)

    # 1. explicit peers: node specific first, then selected, then global
    def rank(p: BGPPeer) -> int:
        return 0 if p.node is not None else 1 if p.node_selector is not None else 2

    for p in sorted((p for p in peer_list if p.peer_ip is not None), key=lambda p: (rank(p), p.name)):
        if not _applies_to(p, my_node) or p.peer_ip is None or p.as_number is None:
            continue
        ip = str(p.peer_ip)
        if ip == me.address or ip in out or p.peer_ip.version != 4:
            continue
        kind = (PEER_NODE_SPECIFIC, PEER_SELECTED, PEER_GLOBAL)[rank(p)]
        out[ip] = Neighbor(
            peer_ip=ip,
            peer_as=p.as_number,
            local_as=me.as_number,
            local_address=me.address,
            router_id=me.router_id,
            peer_type=kind,
            passive=p.passive,
            password=p.password,
            hold_time=p.hold_time if p.hold_time is not None else DEFAULT_HOLD_TIME,
            keepalive=p.keepalive,
            max_prefixes=p.max_prefixes,
            graceful_restart=p.graceful_restart and cluster.graceful_restart_time > 0,
            source=p.name,
        )

    # 2. node peers by peer_selector, in both directions
    others = [n for name, n in sorted(nodes.items()) if name != node_name]
    for p in peer_list:
        if p.peer_selector is None:
            continue
        sel = parse_selector(p.peer_selector)
        if _applies_to(p, my_node):
            for other in others:
                if sel.evaluate(other.labels_with_name):
                    nb = _node_neighbor(me, my_node, other, cluster, PEER_SELECTED, p.name, p)
                    if nb is not None and nb.peer_ip not in out:
                        out[nb.peer_ip] = nb
        if sel.evaluate(my_node.labels_with_name):
            for other in others:
                if _applies_to(p, other):
                    nb = _node_neighbor(me, my_node, other, cluster, PEER_SELECTED, p.name, p)
                    if nb is not None and nb.peer_ip not in out:
                        out[nb.peer_ip] = nb

    # 3. the mesh (or, with reflectors present, the reflector topology it turns into)
    if cluster.node_to_node_mesh:
        any_rr = any(_is_rr(n) for n in nodes.values())
        for other in others:
            if any_rr and not _is_rr(my_node) and not _is_rr(other):
                continue  # clients do not mesh
            nb = _node_neighbor(me, my_node, other, cluster, PEER_MESH, "mesh")
            if nb is not None and nb.peer_ip not in out:
                out[nb.peer_ip] = nb
    return out
