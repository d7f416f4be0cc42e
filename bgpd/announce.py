"""What this node announces, computed purely: its address blocks and borrowed workload addresses.

What it owns: nothing in the kernel or the datastore. :func:`desired_announcements` returns the
prefixes this node originates, each with the attributes ExaBGP must send (:class:`OutAttrs`):

- every IPAM block whose affinity is this node, as one aggregate (``10.65.0.0/26``);
- a /32 for each address of an active local workload that lies outside those blocks (an address
  borrowed from another node's block, or a fixed reservation), so the most specific route wins;
- next hop ``self``, origin IGP, and the cluster's ``communities`` (standard ``a:b`` and large
  ``a:b:c`` are sent as the two BGP attributes they are).

:class:`OutAttrs` is also the shape of reflected routes (``bgpd.rib.reflect``), so one command
formatter (``bgpd.api``) serves both.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from calyx.model import ClusterConfig, IPAMBlock, WorkloadEndpoint


@dataclass(frozen=True, slots=True)
class OutAttrs:
    """Path attributes of routes we send. Equal attributes are sent in one batch."""

    next_hop: str = "self"
    origin: str = "igp"
    as_path: tuple[int, ...] = ()
    local_pref: int | None = None
    med: int | None = None
    communities: tuple[str, ...] = ()
    large_communities: tuple[str, ...] = ()
    originator_id: str | None = None
    cluster_list: tuple[str, ...] = ()


def community_attrs(communities: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split configured communities into (standard, large)."""
    std: list[str] = []
    large: list[str] = []
    for c in communities:
        (large if c.count(":") == 2 else std).append(c)
    return tuple(std), tuple(large)


def desired_announcements(
    node_name: str,
    blocks: Iterable[IPAMBlock],
    workloads: Iterable[WorkloadEndpoint],
    cluster: ClusterConfig,
) -> dict[str, OutAttrs]:
    """prefix → attributes of everything ``node_name`` originates (IPv4)."""
    std, large = community_attrs(cluster.communities)
    attrs = OutAttrs(communities=std, large_communities=large)
    mine = sorted(
        (b.cidr for b in blocks if b.node == node_name and b.cidr.version == 4),
        key=lambda n: (int(n.network_address), n.prefixlen),
    )
    out: dict[str, OutAttrs] = {str(net): attrs for net in mine}
    for wep in workloads:
        if wep.node != node_name or wep.state != "active":
            continue
        for net in wep.ipv4_nets:
            if net.version != 4 or net.prefixlen != 32:
                continue
            addr = net.network_address
            if any(addr in b for b in mine):
                continue
            out[str(ipaddress.IPv4Network(f"{addr}/32"))] = attrs
    return out
